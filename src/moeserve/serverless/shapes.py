"""Expert shapes of published MoE models and of the embedded reference model, in bytes and FLOPs.

An expert here is one SiLU-gated MLP (gate, up and down projections, no biases):
``down(silu(gate(x)) * up(x))`` with gate/up [I, D] and down [D, I]. Shared experts (DeepSeek)
are not counted: they run beside the gate, not in the expert functions.

Shape legend: D hidden size, I expert intermediate size, E routed experts per MoE layer,
K experts per token (top_k), L MoE layers.

This module knows model geometry only; how fast an expert runs is in :mod:`perf`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from moeserve.registry import Registry

EXPERT_SHAPES: Registry[ExpertShape] = Registry("expert shape")
"""Published shapes by name; ``reference_shape()`` reads the embedded model's config instead."""


@dataclass(frozen=True)
class ExpertShape:
    """Geometry of a model's routed experts and the dtype they are served in.

    Contract (``ValueError`` naming the field otherwise): every size >= 1, ``top_k <= num_experts``,
    ``bytes_per_parameter`` and ``bytes_per_activation`` in {1, 2, 4}.
    """

    name: str
    hidden_size: int
    """D: width of the token vectors an expert reads and writes."""
    intermediate_size: int
    """I: width of one expert's hidden layer."""
    num_experts: int
    """E: routed experts per MoE layer."""
    top_k: int
    """K: experts each token is routed to."""
    num_layers: int
    """L: MoE layers."""
    bytes_per_parameter: int = 4
    """Weight dtype size; 4 (float32) by default, the dtype CPU functions run at full speed."""
    bytes_per_activation: int = 4
    """Dtype size of the token vectors sent to and from an expert function."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        for name in ("bytes_per_parameter", "bytes_per_activation"):
            if getattr(self, name) not in (1, 2, 4):
                raise ValueError(f"{name} must be 1, 2 or 4, got {getattr(self, name)!r}")

    @property
    def parameters_per_expert(self) -> int:
        """3 * D * I (gate, up, down)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights at ``bytes_per_parameter``."""
        return self.parameters_per_expert * self.bytes_per_parameter

    @property
    def layer_bytes(self) -> int:
        """Bytes of all E routed experts of one layer."""
        return self.expert_bytes * self.num_experts

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds times two for one token through one expert: 2 * 3 * D * I."""
        return 2 * self.parameters_per_expert

    @property
    def token_bytes(self) -> int:
        """Bytes of one token vector (D values) sent to, or returned from, an expert."""
        return self.hidden_size * self.bytes_per_activation

    def with_dtype(self, bytes_per_parameter: int, bytes_per_activation: int | None = None) -> ExpertShape:
        """The same geometry at another weight (and optionally activation) dtype size."""
        return ExpertShape(
            self.name,
            self.hidden_size,
            self.intermediate_size,
            self.num_experts,
            self.top_k,
            self.num_layers,
            bytes_per_parameter,
            self.bytes_per_activation if bytes_per_activation is None else bytes_per_activation,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_layers": self.num_layers,
            "bytes_per_parameter": self.bytes_per_parameter,
            "bytes_per_activation": self.bytes_per_activation,
            "expert_bytes": self.expert_bytes,
        }


DEEPSEEK_V2_LITE = EXPERT_SHAPES.register("deepseek-v2-lite")(
    ExpertShape("deepseek-v2-lite", 2048, 1408, 64, 6, 26)
)
"""deepseek-ai/DeepSeek-V2-Lite config.json: hidden 2048, moe_intermediate 1408, 64 routed, top-6, 26 MoE layers."""

MIXTRAL_8X7B = EXPERT_SHAPES.register("mixtral-8x7b")(ExpertShape("mixtral-8x7b", 4096, 14336, 8, 2, 32))
"""mistralai/Mixtral-8x7B config.json: hidden 4096, intermediate 14336, 8 experts, top-2, 32 layers."""


def reference_shape(bytes_per_parameter: int = 4) -> ExpertShape:
    """Expert shape of the embedded reference model, read from its ``config.json`` (Mixtral keys)."""
    text = resources.files("moeserve").joinpath("assets", "tiny-moe", "config.json").read_text("utf-8")
    config = json.loads(text)
    return ExpertShape(
        "tiny-moe",
        int(config["hidden_size"]),
        int(config["intermediate_size"]),
        int(config["num_local_experts"]),
        int(config["num_experts_per_tok"]),
        int(config["num_hidden_layers"]),
        bytes_per_parameter,
    )


def checkpoint_shape(folder: str | Path, name: str | None = None) -> ExpertShape:
    """Expert shape of a HF checkpoint folder, from its safetensors (through the ExpertStore: D, I,
    experts per layer, MoE layers) and ``config.json`` (the top-k: the family's field, e.g.
    ``num_experts_per_tok``; 1 if absent). ``name`` defaults to the folder's name. Errors name the
    folder (``ExpertStore``'s)."""
    from moeserve.memory.store import ExpertStore
    from moeserve.models.families import FAMILIES

    folder = Path(folder)
    store = ExpertStore(folder)
    spec = store.layer_spec(store.layers[0])
    config = json.loads((folder / "config.json").read_text("utf-8"))
    top_k = int(config.get("num_experts_per_tok", 0))
    if not top_k and config.get("model_type") in FAMILIES:
        from transformers import AutoConfig  # the family's own names (ERNIE-4.5's moe_k, Hunyuan's moe_topk)

        top_k = FAMILIES.get(config["model_type"]).top_k(AutoConfig.from_pretrained(folder, local_files_only=True))
    return ExpertShape(
        name or folder.name,
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_experts,
        top_k or 1,
        len(store.layers),
    )


def shape_mismatch(planned: ExpertShape, found: ExpertShape, where: str | Path) -> str | None:
    """Why the experts ``found`` in ``where`` cannot serve a plan for ``planned`` (None when D, I and E agree)."""
    if (planned.hidden_size, planned.intermediate_size, planned.num_experts) == (
        found.hidden_size, found.intermediate_size, found.num_experts
    ):  # fmt: skip
        return None
    return (
        f"the plan is for {planned.name} (D={planned.hidden_size}, I={planned.intermediate_size}, "
        f"E={planned.num_experts}); {where} has D={found.hidden_size}, I={found.intermediate_size}, "
        f"E={found.num_experts}"
    )


def shape_by_name(name: str) -> ExpertShape:
    """A registered shape, or the reference model's for ``"tiny-moe"``; ``KeyError`` lists the names."""
    if name == "tiny-moe":
        return reference_shape()
    return EXPERT_SHAPES.get(name)
