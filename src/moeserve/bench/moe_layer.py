"""``moeserve bench moe-layer``: one MoE layer's experts, implementations side by side.

Every implementation runs the same experts (the same weight tensors) on the same hidden states
with the same fixed routing per token count, so the route stage is excluded everywhere:

- ``moeserve-dropless``: :class:`MoELayer` with dropless gating and the ``auto`` backend;
  ``moeserve-dropless-<backend>``: the same with each registered experts backend;
- ``moeserve-capacity-<f>``: the static capacity baseline with capacity factor f (drops and pads);
- ``hf-eager`` / ``hf-grouped_mm``: transformers' own ``MixtralExperts`` on the same tensors,
  with ``config._experts_implementation`` set to ``eager`` / ``grouped_mm``.

Before timing, every implementation's output is compared with the plain per-expert loop
(``moeserve-dropless-loop``); a disagreement raises :class:`OutputMismatchError`. Capacity
impls are compared only when they dropped nothing (otherwise they differ by design).

Timing: a warm-up call each, then ``repeats`` rounds in which every implementation runs once, the
order rotated each round so drifting machine load spreads over all of them; the median is kept.
Each result is also a fraction of the roofline measured in the same run
(:mod:`moeserve.bench.machine`): ``max(flops / peak, bytes / bandwidth) / measured``, where
flops = 2*T*k*3*D*I is the useful routed work (the same for every impl, padding not counted)
and bytes = the weights of the distinct experts touched + the input and output activations.

Shape legend: T tokens, E experts, k top-k, D hidden, I expert intermediate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moeserve.bench.machine import MachinePeak, device_synchronizer, machine_description, measure_machine
from moeserve.config import MoEConfig
from moeserve.moe.backends import BACKENDS, CPU_ONLY_BACKENDS, Activation, grouped_mm_supported
from moeserve.moe.gating import GATINGS
from moeserve.moe.layer import MoELayer
from moeserve.moe.types import ResidentExperts, RouterOutput

SHAPE_NAMES = ("reference", "mixtral")
"""Named layer shapes ``--shape`` accepts."""
DEFAULT_TOKENS = (1, 16, 128, 1024)
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
REFERENCE_IMPL = "moeserve-dropless-loop"
BASELINE_IMPL = "hf-eager"

# Largest relative error (max |out - ref| / max |ref|) accepted against the loop reference.
# Low-precision types round each intermediate; impls round at different points.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 1e-2}

# Mixtral-8x7B is D=4096, I=14336 (1.4 GB per expert in fp32). On the CPU, I is cut 4x so all 8
# experts take 1.4 GB in fp32 (0.7 GB in bf16); E, k, D and the SiLU gated MLP stay Mixtral's. On a
# GPU the layer is Mixtral's own (I=14336: 2.8 GB in bf16).
MIXTRAL_INTERMEDIATE = 14336
MIXTRAL_SCALED_INTERMEDIATE = 3584


class OutputMismatchError(RuntimeError):
    """An implementation's output differs from the loop reference: a bug, not a timing matter."""


@dataclass(frozen=True)
class LayerShape:
    """Shape of one MoE layer's routed experts (a gated MLP per expert)."""

    name: str
    hidden_size: int  # D
    intermediate_size: int  # I
    num_experts: int  # E
    top_k: int  # k
    activation: str = "silu"
    """transformers ``hidden_act`` name of the gate activation."""

    def __post_init__(self) -> None:
        for field_name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's weights (gate, up and down projections)."""
        return 3 * self.hidden_size * self.intermediate_size * _element_size(dtype)


@dataclass(frozen=True)
class BenchLayer:
    """Everything the timing needs: experts, activation and one routed batch of the largest size.

    A token count T uses the first T rows of ``hidden`` and ``routing``.
    """

    shape: LayerShape
    experts: ResidentExperts  # gate_up_proj [E, 2I, D], down_proj [E, D, I]
    act: Activation
    hidden: torch.Tensor  # [T_max, D]
    routing: RouterOutput  # topk_ids [T_max, k], topk_weights [T_max, k]
    weights_source: str
    """Where the expert weights come from (a checkpoint, or random with a seed)."""
    routing_source: str
    """Where the hidden states and routing come from (the real router on text, or a random router)."""

    @property
    def max_tokens(self) -> int:
        return int(self.hidden.shape[0])

    def inputs(self, num_tokens: int) -> tuple[torch.Tensor, RouterOutput]:
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens asked, only {self.max_tokens} prepared")
        routing = RouterOutput(
            topk_ids=self.routing.topk_ids[:num_tokens],
            topk_weights=self.routing.topk_weights[:num_tokens],
        )
        return self.hidden[:num_tokens], routing


@dataclass(frozen=True)
class ImplResult:
    """One implementation at one token count."""

    impl: str
    tokens: int
    tokens_per_s: float
    ms: float
    """Median wall time of one call, milliseconds."""
    dropped_fraction: float
    """Share of (token, expert) assignments dropped (capacity gating; 0 otherwise)."""
    roofline_fraction: float
    """Roofline time / measured time (1.0 = at the machine's measured limit)."""
    vs_hf_eager: float
    """hf-eager ms / this impl's ms at the same token count (> 1 means faster than hf-eager)."""


@dataclass(frozen=True)
class MoELayerBenchResult:
    """A whole ``bench moe-layer`` run; ``to_json()`` is what ``--json`` prints."""

    machine: str
    peak_gflops: float
    bandwidth_gbs: float
    shape: LayerShape
    dtype: torch.dtype
    repeats: int
    weights_source: str
    routing_source: str
    results: list[ImplResult]

    def to_json(self) -> dict:
        return {
            "machine": self.machine,
            "peak_gflops": self.peak_gflops,
            "bandwidth_gbs": self.bandwidth_gbs,
            "shape": {**asdict(self.shape), "weights": self.weights_source, "routing": self.routing_source},
            "dtype": dtype_name(self.dtype),
            "repeats": self.repeats,
            "results": [asdict(result) for result in self.results],
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2)


# ---------------------------------------------------------------------------------------------
# Building the layer


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mixtral_shape(full: bool = False) -> LayerShape:
    """Mixtral-8x7B's MoE layer: with ``full`` its own size (for a GPU), else with I scaled down
    to fit a small machine's memory (see MIXTRAL_SCALED_INTERMEDIATE)."""
    return LayerShape(
        name="mixtral-8x7b" if full else f"mixtral-8x7b (I scaled {MIXTRAL_INTERMEDIATE} -> {MIXTRAL_SCALED_INTERMEDIATE})",
        hidden_size=4096,
        intermediate_size=MIXTRAL_INTERMEDIATE if full else MIXTRAL_SCALED_INTERMEDIATE,
        num_experts=8,
        top_k=2,
    )


def reference_architecture_shape(folder: Path) -> LayerShape:
    """The reference model's layer shape from its config.json, else from the training defaults."""
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        return LayerShape(
            name=f"reference ({folder.name}, architecture only)",
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_experts=int(config["num_local_experts"]),
            top_k=int(config["num_experts_per_tok"]),
            activation=str(config.get("hidden_act", "silu")),
        )
    from moeserve.models.reference import ReferenceModelConfig

    defaults = ReferenceModelConfig()
    return LayerShape(
        name="reference (architecture only; model not built yet)",
        hidden_size=defaults.hidden_size,
        intermediate_size=defaults.intermediate_size,
        num_experts=defaults.num_experts,
        top_k=defaults.top_k,
    )


def random_bench_layer(
    shape: LayerShape, max_tokens: int, dtype: torch.dtype, seed: int = 0, device: torch.device | str = "cpu"
) -> BenchLayer:
    """Random experts (std 1/sqrt(fan_in)) and a random router: softmax over E, top-k, renormalised.

    The router follows Mixtral's: float32 logits of a random [E, D] matrix (std 1/sqrt(D)) on
    standard-normal hidden states, softmax, top-k, weights divided by their sum. Everything is
    drawn on ``device`` (a GPU's generator draws other numbers than the CPU's for one seed).
    """
    from transformers.activations import ACT2FN

    generator = torch.Generator(device=device).manual_seed(seed)
    e, d, i, k = shape.num_experts, shape.hidden_size, shape.intermediate_size, shape.top_k
    gate_up = torch.empty(e, 2 * i, d, dtype=dtype, device=device)  # [E, 2I, D]
    down = torch.empty(e, d, i, dtype=dtype, device=device)  # [E, D, I]
    for expert in range(e):  # one expert at a time keeps the float32 temporaries small
        gate_up[expert] = torch.randn(2 * i, d, generator=generator, device=device) / d**0.5
        down[expert] = torch.randn(d, i, generator=generator, device=device) / i**0.5
    hidden = torch.randn(max_tokens, d, generator=generator, device=device)  # [T, D]
    router = torch.randn(e, d, generator=generator, device=device) / d**0.5  # [E, D]
    routing = softmax_topk_routing(hidden @ router.t(), k)
    return BenchLayer(
        shape=shape,
        experts=ResidentExperts(gate_up_proj=gate_up, down_proj=down),
        act=ACT2FN[shape.activation],
        hidden=hidden.to(dtype),
        routing=routing,
        weights_source=f"random (seed {seed})",
        routing_source=f"softmax-top-{k} of a random router on random hidden states (seed {seed})",
    )


def softmax_topk_routing(logits: torch.Tensor, top_k: int) -> RouterOutput:
    """Mixtral-style routing from logits [T, E]: softmax in float32, top-k, renormalised weights."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k] each
    return RouterOutput(topk_ids=ids, topk_weights=weights / weights.sum(dim=-1, keepdim=True), logits=logits)


def _sample_token_ids(tokenizer, count: int, vocab_size: int) -> tuple[torch.Tensor, str]:
    """``count`` token ids of Python standard-library source (the reference model's domain)."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (count,), generator=generator), "random token ids (no tokenizer)"
    ids: list[int] = []
    for module in (argparse, textwrap, json.decoder, statistics):
        assert module.__file__ is not None, "stdlib modules are plain source files"
        ids += tokenizer(Path(module.__file__).read_text(encoding="utf-8"))["input_ids"]
        if len(ids) >= count:
            break
    repeats = -(-count // max(1, len(ids)))
    return torch.tensor((ids * repeats)[:count]), "Python stdlib source (argparse.py, ...)"


@torch.inference_mode()
def model_bench_layer(
    model_path: Path | None, max_tokens: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> BenchLayer:
    """The checkpoint's first MoE layer, with hidden states and routing captured from a real forward.

    The model runs on standard-library source in sequences of at most 256 tokens; the first MoE
    layer's input hidden states and its router's choices are recorded.
    """
    from moeserve.models.loader import load_model

    model = load_model(model_path, dtype=dtype, device=device)
    layer = model.layers[0]
    stacked = layer.experts.stacked()
    assert stacked is not None, "load_model keeps every expert resident"
    gate_up, down = stacked
    config = model.config
    shape = LayerShape(
        name=model.name,
        hidden_size=int(gate_up.shape[2]),
        intermediate_size=int(down.shape[2]),
        num_experts=int(gate_up.shape[0]),
        top_k=model.top_k,
        activation=str(getattr(config, "hidden_act", "silu")),
    )
    seq_len = min(256, int(getattr(config, "max_position_embeddings", 256)))
    num_seqs = -(-max_tokens // seq_len)
    token_ids, text_source = _sample_token_ids(model.tokenizer, num_seqs * seq_len, int(config.vocab_size))
    captured: list[tuple[torch.Tensor, RouterOutput]] = []

    def record(_module, args):
        captured.append((args[0].detach().clone(), args[1]))

    handle = layer.register_forward_pre_hook(record)
    try:
        model.hf_model(input_ids=token_ids.view(num_seqs, seq_len).to(model.device), use_cache=False)
    finally:
        handle.remove()
    hidden = torch.cat([h for h, _ in captured])[:max_tokens]  # [T, D]
    routing = RouterOutput(
        topk_ids=torch.cat([r.topk_ids for _, r in captured])[:max_tokens],
        topk_weights=torch.cat([r.topk_weights for _, r in captured])[:max_tokens],
    )
    return BenchLayer(
        shape=shape,
        experts=ResidentExperts(gate_up_proj=gate_up, down_proj=down),
        act=layer.act,
        hidden=hidden,
        routing=routing,
        weights_source=f"checkpoint {model.path}",
        routing_source=f"the model's router on its first MoE layer's input, text: {text_source}",
    )


def build_bench_layer(
    shape: str, model_path: Path | None, max_tokens: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> BenchLayer:
    """Resolve ``--shape`` / ``--model`` into a layer ready to time on ``device``.

    ``reference``: ``model_path`` (or the embedded reference model) when it exists; without it,
    the reference architecture with random weights and a random router. ``mixtral``: the
    Mixtral shape with random weights (I scaled down on the CPU, Mixtral's own on a GPU).
    """
    on_gpu = torch.device(device).type == "cuda"
    if shape not in SHAPE_NAMES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")
    if shape == "mixtral":
        if model_path is not None:
            raise ValueError(
                "--model applies to shape 'reference' (the checkpoint's own layer), not 'mixtral'"
            )
        return random_bench_layer(mixtral_shape(full=on_gpu), max_tokens, dtype, device=device)
    if model_path is not None:
        return model_bench_layer(model_path, max_tokens, dtype, device)
    from moeserve.models.loader import REFERENCE_MODEL

    if (REFERENCE_MODEL / "config.json").is_file() and any(REFERENCE_MODEL.glob("*.safetensors")):
        return model_bench_layer(None, max_tokens, dtype, device)
    return random_bench_layer(reference_architecture_shape(REFERENCE_MODEL), max_tokens, dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Implementations

Impl = Callable[[torch.Tensor, RouterOutput], torch.Tensor]  # (hidden [T, D], routing) -> [T, D]


def hf_experts(layer: BenchLayer, implementation: str) -> torch.nn.Module:
    """transformers' ``MixtralExperts`` sharing ``layer``'s weight tensors, forced to ``implementation``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    shape = layer.shape
    config = MixtralConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        hidden_act=shape.activation,
    )
    # ``use_experts_implementation`` reads this on every forward to pick the experts function.
    config._experts_implementation = implementation
    with torch.device("meta"):  # no allocation: the parameters are replaced just below
        experts = MixtralExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(layer.experts.gate_up_proj, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(layer.experts.down_proj, requires_grad=False)
    experts.act_fn = layer.act
    return experts.eval()


def build_impls(layer: BenchLayer) -> dict[str, Impl]:
    """Every implementation, by name, over ``layer``'s weights (insertion order is table order).

    On a GPU the CPU-only backends (:data:`CPU_ONLY_BACKENDS`) are left out, and the grouped-matmul
    impls (moeserve's and transformers') too where this build's ``_grouped_mm`` does not take the
    dtype on that GPU.
    """
    impls: dict[str, Impl] = {}
    weights = layer.experts.gate_up_proj
    on_gpu = weights.device.type == "cuda"
    grouped = grouped_mm_supported(weights.device, weights.dtype) if on_gpu else hasattr(torch, "_grouped_mm")

    def add_moeserve(name: str, config: MoEConfig) -> None:
        impls[name] = MoELayer(layer.experts, layer.act, config)

    add_moeserve("moeserve-dropless", MoEConfig(gating="dropless", backend="auto"))
    for backend in BACKENDS.names():
        if (backend == "grouped_mm" and not grouped) or (on_gpu and backend in CPU_ONLY_BACKENDS):
            continue
        add_moeserve(f"moeserve-dropless-{backend}", MoEConfig(gating="dropless", backend=backend))
    for factor in CAPACITY_FACTORS:
        add_moeserve(f"moeserve-capacity-{factor}", MoEConfig(gating="capacity", capacity_factor=factor))
    for implementation in ("eager", "grouped_mm") if grouped else ("eager",):
        experts = hf_experts(layer, implementation)
        impls[f"hf-{implementation}"] = _hf_impl(experts)
    return impls


def _hf_impl(experts: torch.nn.Module) -> Impl:
    def run(hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        return experts(hidden, routing.topk_ids, routing.topk_weights)

    return run


def capacity_factor_of(impl: str) -> float | None:
    prefix = "moeserve-capacity-"
    return float(impl.removeprefix(prefix)) if impl.startswith(prefix) else None


def dropped_fraction(impl: str, hidden: torch.Tensor, routing: RouterOutput, num_experts: int) -> float:
    """Share of assignments the impl drops on this routing (0 unless capacity-gated)."""
    factor = capacity_factor_of(impl)
    if factor is None:
        return 0.0
    return GATINGS.get("capacity")(hidden, routing, num_experts, factor).dropped_fraction


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference|, in float32."""
    difference = (output.float() - reference.float()).abs().max()
    return float(difference / reference.float().abs().max().clamp_min(1e-12))


@torch.inference_mode()
def check_outputs(
    impls: dict[str, Impl], layer: BenchLayer, num_tokens: int, dropped: dict[str, float]
) -> dict[str, float]:
    """Run every impl once on ``num_tokens`` tokens; raise unless each agrees with the loop reference.

    Capacity impls that dropped assignments are not compared (they differ by design). Returns
    each compared impl's relative error.
    """
    hidden, routing = layer.inputs(num_tokens)
    reference = impls[REFERENCE_IMPL](hidden, routing)
    tolerance = _TOLERANCE.get(hidden.dtype, 1e-2)
    errors: dict[str, float] = {}
    for name, run in impls.items():
        output = run(hidden, routing)
        if output.shape != reference.shape or output.dtype != reference.dtype:
            raise OutputMismatchError(
                f"{name} returned {tuple(output.shape)} {output.dtype}, the reference "
                f"{tuple(reference.shape)} {reference.dtype} (T={num_tokens})"
            )
        if dropped[name] > 0:
            continue
        errors[name] = relative_error(output, reference)
        if not errors[name] <= tolerance:
            raise OutputMismatchError(
                f"{name} differs from {REFERENCE_IMPL} at T={num_tokens} in {dtype_name(hidden.dtype)}: "
                f"relative error {errors[name]:.3g} > {tolerance:g}"
            )
    return errors


# ---------------------------------------------------------------------------------------------
# Timing


def roofline_seconds(
    shape: LayerShape, routing: RouterOutput, dtype: torch.dtype, machine: MachinePeak
) -> float:
    """Ideal time: max(useful flops / peak, (touched expert weights + activations) / bandwidth)."""
    num_tokens = routing.topk_ids.shape[0]
    d, i, k = shape.hidden_size, shape.intermediate_size, shape.top_k
    flops = 2 * num_tokens * k * 3 * d * i
    touched_experts = int(routing.topk_ids.unique().numel())
    num_bytes = touched_experts * shape.expert_bytes(dtype) + 2 * num_tokens * d * _element_size(dtype)
    return max(flops / (machine.peak_gflops * 1e9), num_bytes / (machine.bandwidth_gbs * 1e9))


@torch.inference_mode()
def time_impls(
    impls: dict[str, Impl],
    layer: BenchLayer,
    num_tokens: int,
    repeats: int,
    warmup: int = 1,
    advance: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per impl; impls interleaved, the order rotated every round."""
    hidden, routing = layer.inputs(num_tokens)
    sync = device_synchronizer(hidden.device)  # a GPU call is timed until its kernels finished
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            impls[name](hidden, routing)
            sync()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
            advance()
    return {name: statistics.median(values) for name, values in times.items()}


def bench_layer(
    layer: BenchLayer,
    tokens: Sequence[int],
    repeats: int,
    machine: MachinePeak | None = None,
    *,
    warmup: int = 1,
    progress: bool = False,
) -> MoELayerBenchResult:
    """Check every impl against the loop reference, then time them all at each token count.

    ``machine`` None measures the machine's limits before and after the timings and keeps the
    better of each (a shared machine's load drifts; the limit is a best case).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not tokens or min(tokens) < 1:
        raise ValueError(f"token counts must be >= 1, got {list(tokens)}")
    dtype, device = layer.experts.gate_up_proj.dtype, layer.experts.gate_up_proj.device
    before = measure_machine(dtype, device=device) if machine is None else machine
    impls = build_impls(layer)
    # Per token count: (seconds per impl, dropped fraction per impl, routing).
    measured: list[tuple[int, dict[str, float], dict[str, float], RouterOutput]] = []
    bar = _progress_bar(enabled=progress)
    with bar:
        task = bar.add_task("moe-layer", total=len(tokens) * len(impls) * (warmup + repeats))
        for num_tokens in tokens:
            bar.update(task, description=f"T={num_tokens}")
            hidden, routing = layer.inputs(num_tokens)
            dropped = {
                name: dropped_fraction(name, hidden, routing, layer.shape.num_experts) for name in impls
            }
            check_outputs(impls, layer, num_tokens, dropped)
            seconds = time_impls(impls, layer, num_tokens, repeats, warmup, lambda: bar.advance(task))
            measured.append((num_tokens, seconds, dropped, routing))
    if machine is None:
        after = measure_machine(dtype, device=device)
        machine = MachinePeak(
            peak_gflops=max(before.peak_gflops, after.peak_gflops),
            bandwidth_gbs=max(before.bandwidth_gbs, after.bandwidth_gbs),
            dtype=dtype,
        )
    results: list[ImplResult] = []
    for num_tokens, seconds, dropped, routing in measured:
        ideal = roofline_seconds(layer.shape, routing, dtype, machine)
        for name in impls:
            results.append(
                ImplResult(
                    impl=name,
                    tokens=num_tokens,
                    tokens_per_s=num_tokens / seconds[name],
                    ms=seconds[name] * 1e3,
                    dropped_fraction=dropped[name],
                    roofline_fraction=ideal / seconds[name],
                    vs_hf_eager=seconds[BASELINE_IMPL] / seconds[name],
                )
            )
    return MoELayerBenchResult(
        machine=machine_description(device),
        peak_gflops=machine.peak_gflops,
        bandwidth_gbs=machine.bandwidth_gbs,
        shape=layer.shape,
        dtype=dtype,
        repeats=repeats,
        weights_source=layer.weights_source,
        routing_source=layer.routing_source,
        results=results,
    )


def _progress_bar(enabled: bool) -> Progress:
    # The bar goes to stderr so ``--json`` on stdout stays parseable.
    return Progress(
        TextColumn("[bold]moe-layer[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def run_moe_layer_bench(
    shape: str | LayerShape,
    model_path: Path | None,
    tokens: list[int],
    dtype: torch.dtype,
    repeats: int,
    progress: bool,
    *,
    machine: MachinePeak | None = None,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> MoELayerBenchResult:
    """Entry point of ``moeserve bench moe-layer``.

    ``shape`` is a name from :data:`SHAPE_NAMES` or a custom :class:`LayerShape` (random weights
    and router). ``machine`` skips measuring the machine's limits when given. ``device`` is
    ``cpu`` or ``cuda``: layer, inputs and the roofline measurement all live there.
    """
    if not tokens or min(tokens) < 1:
        raise ValueError(f"token counts must be >= 1, got {tokens}")
    if isinstance(shape, LayerShape):
        layer = random_bench_layer(shape, max(tokens), dtype, device=device)
    else:
        layer = build_bench_layer(shape, model_path, max(tokens), dtype, device)
    return bench_layer(layer, tokens, repeats, machine, warmup=warmup, progress=progress)


# ---------------------------------------------------------------------------------------------
# Report


def render_table(result: MoELayerBenchResult) -> Table:
    """The human-readable table: one row per (token count, impl)."""
    shape = result.shape
    table = Table(
        title=(
            f"MoE layer {shape.name}: E={shape.num_experts} k={shape.top_k} D={shape.hidden_size} "
            f"I={shape.intermediate_size} {shape.activation}, {dtype_name(result.dtype)}, "
            f"median of {result.repeats}"
        ),
        caption=(
            f"{result.machine}\nmeasured now: matmul peak {result.peak_gflops:.1f} GFLOP/s, copy "
            f"bandwidth {result.bandwidth_gbs:.1f} GB/s\nweights: {result.weights_source}; routing: "
            f"{result.routing_source}; route stage excluded for every impl"
        ),
    )
    for column in ("tokens", "impl", "ms", "tokens/s", "vs hf-eager", "roofline", "dropped"):
        table.add_column(column, justify="left" if column == "impl" else "right", no_wrap=True)
    previous_tokens = None
    for row in result.results:
        if previous_tokens is not None and row.tokens != previous_tokens:
            table.add_section()
        previous_tokens = row.tokens
        table.add_row(
            str(row.tokens),
            row.impl,
            f"{row.ms:.3f}",
            f"{row.tokens_per_s:,.0f}",
            f"{row.vs_hf_eager:.2f}x",
            f"{row.roofline_fraction:.1%}",
            f"{row.dropped_fraction:.1%}" if capacity_factor_of(row.impl) is not None else "-",
        )
    return table
