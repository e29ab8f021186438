"""Expert-worker side: the experts one rank holds, run on rows grouped by expert.

Shape legend: n rows, D hidden, I expert intermediate, E experts per layer, L MoE layers.

An :class:`ExpertShard` holds, per MoE layer, only the experts the placement gives its rank
(read one by one from the checkpoint with :class:`~moeserve.memory.store.ExpertStore`, or drawn
from a seed for the synthetic trace workload) and runs them with a registered experts backend
(chosen once, here). It knows nothing of processes or modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.moe.backends import BACKENDS, Activation, resolve_backend
from moeserve.moe.types import ExpertGroups


@dataclass(frozen=True)
class ShardLayer:
    """One layer's held experts; an :class:`~moeserve.moe.types.ExpertProvider` over E ids."""

    num_experts: int
    held: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """expert id -> (gate_up [2I, D], down [D, I])."""

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.held.values()))[0].dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.held.values()))[0].device

    def gate_up(self, expert: int) -> torch.Tensor:
        return self.held[expert][0]

    def down(self, expert: int) -> torch.Tensor:
        return self.held[expert][1]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


class ExpertShard:
    """The experts of one expert worker, every layer. ``run(layer, rows, expert_ids) -> outputs``."""

    def __init__(self, layers: list[ShardLayer], act: Activation, backend: str = "auto") -> None:
        if not layers or any(not layer.held for layer in layers):
            raise ValueError("an expert shard needs at least one expert in every layer")
        self.layers = layers
        self.act = act
        self.backend_name = resolve_backend(backend, layers[0].device, layers[0].dtype, stacked=False)
        self._run_experts = BACKENDS.get(self.backend_name)()

    def held_counts(self) -> list[int]:
        """[L] experts held per layer."""
        return [len(layer.held) for layer in self.layers]

    def run_grouped(self, layer: int, rows: torch.Tensor, expert_counts: torch.Tensor) -> torch.Tensor:
        """Outputs [n, D] for rows [n, D] already grouped by expert (ascending), ``expert_counts`` [E]."""
        shard = self.layers[layer]
        groups = ExpertGroups(
            rows=rows,
            row2token=torch.zeros(0, dtype=torch.int64),
            row_weights=torch.zeros(0),
            expert_counts=expert_counts,
            capacity=None,
            dropped=torch.zeros((), dtype=torch.int64),
            assignments=rows.shape[0],
        )
        return self._run_experts(groups, shard, self.act)

    def run(self, layer: int, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Outputs [n, D] for rows [n, D] in any order, ``expert_ids`` [n]: groups, runs, restores order."""
        order = torch.argsort(expert_ids, stable=True)  # [n] keeps arrival order within an expert
        counts = torch.bincount(expert_ids, minlength=self.layers[layer].num_experts)  # [E]
        grouped = self.run_grouped(layer, rows.index_select(0, order), counts)  # [n, D]
        outputs = torch.empty_like(grouped)
        outputs[order] = grouped
        return outputs


def shard_from_checkpoint(folder: str, expert2worker: torch.Tensor, worker: int) -> ExpertShard:
    """Read worker ``worker``'s experts (``expert2worker`` [L, E] == worker) from the checkpoint only.

    MoE layer i is the i-th decoder layer, ascending, that has routed experts.
    """
    import json
    from pathlib import Path

    from transformers.activations import ACT2FN

    from moeserve.memory.store import ExpertStore

    store = ExpertStore(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    layers = []
    for moe_layer, decoder_layer in enumerate(store.layers):
        held = {}
        for expert in torch.nonzero(expert2worker[moe_layer] == worker).flatten().tolist():
            tensors = store.read_expert(decoder_layer, expert, dtype=torch.float32)
            held[expert] = (tensors.gate_up, tensors.down)
        layers.append(ShardLayer(num_experts=store.num_experts(decoder_layer), held=held))
    return ExpertShard(layers, ACT2FN[config.get("hidden_act", "silu")])


def synthetic_expert(
    seed: int, layer: int, expert: int, hidden: int, intermediate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, D], down [D, I]) of one random expert, the same in every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 4099 + expert)
    scale_in, scale_out = hidden**-0.5, intermediate**-0.5
    gate_up = torch.randn(2 * intermediate, hidden, generator=generator) * scale_in
    down = torch.randn(hidden, intermediate, generator=generator) * scale_out
    return gate_up, down


def synthetic_shard(
    expert2worker: torch.Tensor, worker: int, seed: int, hidden: int, intermediate: int
) -> ExpertShard:
    """Random-weight experts (:func:`synthetic_expert`) that ``expert2worker`` [L, E] gives ``worker``."""
    layers = []
    for layer, row in enumerate(expert2worker):
        held = {
            expert: synthetic_expert(seed, layer, expert, hidden, intermediate)
            for expert in torch.nonzero(row == worker).flatten().tolist()
        }
        layers.append(ShardLayer(num_experts=row.numel(), held=held))
    return ExpertShard(layers, torch.nn.functional.silu)
