"""MoE layer invariants (STYLE.md 16): every backend against the loop reference, and the
mixture identities that pin down dispatch and combine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.config import MoEConfig
from moeserve.moe.backends import BACKENDS, experts_loop
from moeserve.moe.gating import capacity_slots, dispatch_capacity, dispatch_dropless
from moeserve.moe.layer import MoELayer
from moeserve.moe.types import ResidentExperts, RouterOutput

T, E, K, D, I = 37, 6, 2, 16, 24  # noqa: E741  tokens, experts, top-k, hidden, intermediate


def _experts(num_experts: int = E, dtype=torch.float32, seed: int = 0) -> ResidentExperts:
    generator = torch.Generator().manual_seed(seed)
    return ResidentExperts(
        gate_up_proj=(torch.randn(num_experts, 2 * I, D, generator=generator) / D**0.5).to(dtype),
        down_proj=(torch.randn(num_experts, D, I, generator=generator) / I**0.5).to(dtype),
    )


def _routing(num_tokens: int = T, num_experts: int = E, top_k: int = K, seed: int = 1, skew: float = 0.0) -> RouterOutput:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    logits[:, 0] += skew  # skew > 0 makes expert 0 hot
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return RouterOutput(topk_ids=ids, topk_weights=weights / weights.sum(-1, keepdim=True), logits=logits)


def _dense_expert(x: torch.Tensor, experts: ResidentExperts, e: int) -> torch.Tensor:
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def _hidden(num_tokens: int = T, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(num_tokens, D, generator=torch.Generator().manual_seed(2)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS.names())
@pytest.mark.parametrize("num_tokens", [1, 2, 5, T, 300])
def test_backends_match_loop_reference_dropless(backend, num_tokens):
    experts, hidden, routing = _experts(), _hidden(num_tokens), _routing(num_tokens)
    reference = MoELayer(experts, F.silu, MoEConfig(backend="loop"))(hidden, routing)
    actual = MoELayer(experts, F.silu, MoEConfig(backend=backend))(hidden, routing)
    torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_backends_match_loop_reference_bfloat16(backend):
    experts, hidden, routing = _experts(dtype=torch.bfloat16), _hidden(64, torch.bfloat16), _routing(64)
    reference = MoELayer(experts, F.silu, MoEConfig(backend="loop"))(hidden, routing)
    actual = MoELayer(experts, F.silu, MoEConfig(backend=backend))(hidden, routing)
    torch.testing.assert_close(actual.float(), reference.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_capacity_backends_match_loop(backend):
    experts, hidden, routing = _experts(), _hidden(), _routing(skew=2.0)
    config = MoEConfig(gating="capacity", capacity_factor=1.0)
    reference = MoELayer(experts, F.silu, MoEConfig(gating="capacity", capacity_factor=1.0, backend="loop"))
    actual = MoELayer(experts, F.silu, MoEConfig(gating=config.gating, capacity_factor=1.0, backend=backend))
    torch.testing.assert_close(actual(hidden, routing), reference(hidden, routing), rtol=1e-5, atol=1e-5)


def test_matches_naive_per_token_mixture():
    """Output of token t is sum_j w[t,j] * expert_{id[t,j]}(x_t), computed token by token."""
    experts, hidden, routing = _experts(), _hidden(), _routing()
    out = MoELayer(experts, F.silu, MoEConfig())(hidden, routing)
    for t in range(T):
        want = sum(
            routing.topk_weights[t, j] * _dense_expert(hidden[t : t + 1], experts, int(routing.topk_ids[t, j]))
            for j in range(K)
        )
        torch.testing.assert_close(out[t : t + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_one_expert_equals_dense_mlp(backend):
    experts, hidden = _experts(num_experts=1), _hidden()
    routing = RouterOutput(topk_ids=torch.zeros(T, 1, dtype=torch.int64), topk_weights=torch.ones(T, 1))
    out = MoELayer(experts, F.silu, MoEConfig(backend=backend))(hidden, routing)
    torch.testing.assert_close(out, _dense_expert(hidden, experts, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_top_k_equal_to_num_experts_is_dense_mixture(backend):
    experts, hidden = _experts(), _hidden()
    routing = _routing(top_k=E)
    out = MoELayer(experts, F.silu, MoEConfig(backend=backend))(hidden, routing)
    # Every expert sees every token; weight them by each token's gate weight of that expert.
    dense_weights = torch.zeros(T, E).scatter(1, routing.topk_ids, routing.topk_weights)  # [T, E]
    want = sum(dense_weights[:, e : e + 1] * _dense_expert(hidden, experts, e) for e in range(E))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_dropless_keeps_every_assignment_grouped_by_expert():
    hidden, routing = _hidden(), _routing(skew=3.0)
    groups = dispatch_dropless(hidden, routing, E)
    assert groups.rows.shape == (T * K, D)
    assert int(groups.dropped) == 0 and groups.dropped_fraction == 0.0
    assert groups.expert_counts.tolist() == torch.bincount(routing.topk_ids.flatten(), minlength=E).tolist()
    # Rows are grouped by expert in ascending order and each row is its token's hidden state.
    row_experts = torch.repeat_interleave(torch.arange(E), groups.expert_counts)
    assert torch.equal(groups.rows, hidden[groups.row2token])
    assert bool((row_experts[1:] >= row_experts[:-1]).all())


def test_capacity_drops_overflow_and_pads():
    hidden, routing = _hidden(), _routing(skew=3.0)
    capacity = capacity_slots(T, K, E, 1.0)
    groups = dispatch_capacity(hidden, routing, E, 1.0)
    assert groups.capacity == capacity == -(-T * K // E)
    assert groups.rows.shape == (E * capacity, D)
    counts = torch.bincount(routing.topk_ids.flatten(), minlength=E)
    expected_dropped = int((counts - capacity).clamp(min=0).sum())
    assert int(groups.dropped) == expected_dropped > 0
    assert groups.dropped_fraction == pytest.approx(expected_dropped / (T * K))
    # Padded rows carry weight 0; kept rows are copies of their token.
    kept = groups.row_weights != 0
    assert int(kept.sum()) == T * K - expected_dropped
    assert torch.equal(groups.rows[kept], hidden[groups.row2token[kept]])


def test_capacity_first_choices_win_slots():
    # Two experts, capacity 1 each: token 0 and token 1 both choose expert 0 first.
    hidden = _hidden(2)
    routing = RouterOutput(topk_ids=torch.tensor([[0, 1], [0, 1]]), topk_weights=torch.full((2, 2), 0.5))
    groups = dispatch_capacity(hidden, routing, 2, 0.5)  # C = ceil(0.5 * 2 * 2 / 2) = 1
    assert groups.capacity == 1
    assert groups.row2token.tolist() == [0, 0]  # expert 0 keeps token 0, expert 1 keeps token 0's 2nd choice
    assert int(groups.dropped) == 2


def test_large_capacity_equals_dropless():
    experts, hidden, routing = _experts(), _hidden(), _routing(skew=2.0)
    dropless = MoELayer(experts, F.silu, MoEConfig())(hidden, routing)
    capacity = MoELayer(experts, F.silu, MoEConfig(gating="capacity", capacity_factor=float(E)))
    torch.testing.assert_close(capacity(hidden, routing), dropless, rtol=1e-5, atol=1e-5)
    assert capacity.stats.dropped == 0


def test_layer_counts_drops_and_calls():
    layer = MoELayer(_experts(), F.silu, MoEConfig(gating="capacity", capacity_factor=1.0))
    layer(_hidden(), _routing(skew=3.0))
    assert layer.stats.calls == 1 and layer.stats.tokens == T and layer.stats.assignments == T * K
    assert layer.stats.dropped > 0


def test_loop_backend_reads_experts_one_at_a_time():
    """The loop reference only asks the provider for experts that received tokens."""
    experts = _experts()
    asked: list[int] = []

    class Recording:
        num_experts = E

        def gate_up(self, e):
            asked.append(e)
            return experts.gate_up(e)

        def down(self, e):
            return experts.down(e)

        def stacked(self):
            return None

    routing = RouterOutput(topk_ids=torch.tensor([[3, 1]]), topk_weights=torch.tensor([[0.7, 0.3]]))
    groups = dispatch_dropless(_hidden(1), routing, E)
    experts_loop(groups, Recording(), F.silu)
    assert asked == [1, 3]


def test_unknown_names_list_known_ones():
    with pytest.raises(KeyError, match="known: cpu, grouped_mm, hybrid, loop"):
        MoELayer(_experts(), F.silu, MoEConfig(backend="nope"))
    with pytest.raises(ValueError, match="gating must be"):
        MoEConfig(gating="static")
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoEConfig(gating="capacity", capacity_factor=0)


def test_auto_backend_is_chosen_once_from_device_and_dtype():
    from moeserve.moe.backends import cpu_has_native_low_precision_matmul, resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "hybrid"
    assert resolve_backend("auto", cpu, torch.float32, stacked=False) == "hybrid"  # an expert cache: per-expert loops
    expected_bf16 = "loop" if cpu_has_native_low_precision_matmul() else "hybrid"
    assert resolve_backend("auto", cpu, torch.bfloat16) == expected_bf16
    assert resolve_backend("grouped_mm", cpu, torch.float32) == "grouped_mm"
    assert MoELayer(_experts(dtype=torch.bfloat16), F.silu, MoEConfig()).backend_name == expected_bf16


def test_cpu_backend_fp32_compute_matches_reference_on_large_groups():
    """bf16 groups of >= UPCAST_MIN_ROWS rows are computed in fp32: closer to an fp32 reference."""
    from moeserve.moe.backends import UPCAST_MIN_ROWS

    experts, hidden = _experts(dtype=torch.bfloat16), _hidden(4 * UPCAST_MIN_ROWS, torch.bfloat16)
    routing = _routing(4 * UPCAST_MIN_ROWS)
    fast = MoELayer(experts, F.silu, MoEConfig(backend="cpu"))(hidden, routing).float()
    reference = MoELayer(experts, F.silu, MoEConfig(backend="loop"))(hidden, routing).float()
    full_precision = ResidentExperts(experts.gate_up_proj.float(), experts.down_proj.float())
    exact = MoELayer(full_precision, F.silu, MoEConfig(backend="loop"))(hidden.float(), routing)
    torch.testing.assert_close(fast, reference, rtol=3e-2, atol=3e-2)
    assert (fast - exact).abs().mean() <= (reference - exact).abs().mean()


def test_routing_transforms_run_before_observers_and_dispatch():
    experts, hidden, routing = _experts(), _hidden(), _routing()
    layer = MoELayer(experts, F.silu, MoEConfig())
    forced = RouterOutput(topk_ids=torch.zeros_like(routing.topk_ids), topk_weights=torch.full_like(routing.topk_weights, 0.5))
    seen: list[RouterOutput] = []
    layer.routing_transforms.append(lambda index, r: forced)
    layer.observers.append(lambda index, r: seen.append(r))
    out = layer(hidden, routing)
    assert seen == [forced]
    torch.testing.assert_close(out, _dense_expert(hidden, experts, 0), rtol=1e-5, atol=1e-5)


def test_hybrid_backend_follows_weights_changed_in_place():
    """``hybrid`` keeps a transposed copy of small experts; an in-place reload must refresh it."""
    experts, hidden, routing = _experts(), _hidden(16), _routing(16)
    layer = MoELayer(experts, F.silu, MoEConfig(backend="hybrid"))
    layer(hidden, routing)
    with torch.no_grad():
        experts.gate_up_proj.mul_(0.5)
        experts.down_proj.copy_(_experts(seed=3).down_proj)
    reference = MoELayer(experts, F.silu, MoEConfig(backend="loop"))(hidden, routing)
    torch.testing.assert_close(layer(hidden, routing), reference, rtol=1e-5, atol=1e-5)


class _OneAtATime:
    """The same experts as a provider that is not stacked (as an expert cache is)."""

    def __init__(self, experts: ResidentExperts) -> None:
        self.inner = experts
        self.num_experts, self.dtype, self.device = experts.num_experts, experts.dtype, experts.device

    def gate_up(self, expert: int) -> torch.Tensor:
        return self.inner.gate_up(expert).clone()

    def down(self, expert: int) -> torch.Tensor:
        return self.inner.down(expert).clone()

    def stacked(self):
        return None


@pytest.mark.parametrize("chunk_rows", [None, 1, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 2, 16, 300])
def test_hybrid_is_bit_identical_with_and_without_stacked_experts(num_tokens, dtype, chunk_rows, monkeypatch):
    """An exact expert cache must reproduce the resident layer bit for bit: ``hybrid`` runs
    per-expert loops with the arithmetic of its grouped path when experts are not stacked
    (bf16: both in fp32 from the same converted values); large steps run the grouped path over
    runs of experts (``chunk_rows`` lowers the threshold so these steps take that path)."""
    from moeserve.moe import backends
    from moeserve.moe.backends import cpu_has_native_low_precision_matmul

    if chunk_rows is not None:
        monkeypatch.setattr(backends, "HYBRID_CHUNK_ROWS", chunk_rows)
    experts, hidden, routing = _experts(dtype=dtype), _hidden(num_tokens, dtype), _routing(num_tokens)
    resident = MoELayer(experts, F.silu, MoEConfig(backend="auto"))
    cached = MoELayer(_OneAtATime(experts), F.silu, MoEConfig(backend="auto"))
    native = dtype == torch.bfloat16 and cpu_has_native_low_precision_matmul()
    assert resident.backend_name == cached.backend_name == ("loop" if native else "hybrid")
    assert torch.equal(cached(hidden, routing), resident(hidden, routing))
    hybrid = MoELayer(_OneAtATime(experts), F.silu, MoEConfig(backend="hybrid"))
    assert torch.equal(hybrid(hidden, routing), MoELayer(experts, F.silu, MoEConfig(backend="hybrid"))(hidden, routing))


def test_expert_chunks_cover_every_expert_once_in_runs_of_bounded_rows():
    from moeserve.moe.backends import expert_chunks

    counts = [3, 0, 5, 9, 1, 1, 0, 2]
    chunks = expert_chunks(counts, 6)
    assert chunks == [(0, 2, 0, 3), (2, 3, 3, 8), (3, 4, 8, 17), (4, 8, 17, 21)]
    # Runs are contiguous in experts and rows; only a single expert may exceed the bound.
    assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]]
    assert [c[2] for c in chunks[1:]] == [c[3] for c in chunks[:-1]]
    assert all(c[3] - c[2] == sum(counts[c[0]:c[1]]) for c in chunks)
    assert all(c[3] - c[2] <= 6 or c[1] - c[0] == 1 for c in chunks)
    assert expert_chunks([], 6) == []
    assert expert_chunks([0, 0], 6) == [(0, 2, 0, 0)]


@pytest.mark.parametrize("gating", ["dropless", "capacity"])
@pytest.mark.parametrize("num_tokens", [2, 16, 300])
def test_hybrid_bfloat16_computes_in_float32(num_tokens, gating):
    """bf16 through ``hybrid`` equals the fp32 computation on the bf16 values, rounded once."""
    experts, hidden, routing = _experts(dtype=torch.bfloat16), _hidden(num_tokens, torch.bfloat16), _routing(num_tokens)
    config = MoEConfig(gating=gating, capacity_factor=1.25, backend="hybrid")
    actual = MoELayer(experts, F.silu, config)(hidden, routing)
    full = ResidentExperts(experts.gate_up_proj.float(), experts.down_proj.float())
    reference = MoELayer(full, F.silu, MoEConfig(gating=gating, capacity_factor=1.25, backend="loop"))
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), reference(hidden.float(), routing), rtol=1e-2, atol=1e-2)


# -- on a GPU (marked ``gpu``: skipped without CUDA) ---------------------------------------------


def _on(experts: ResidentExperts, device: str) -> ResidentExperts:
    return ResidentExperts(gate_up_proj=experts.gate_up_proj.to(device), down_proj=experts.down_proj.to(device))


def _routing_on(routing: RouterOutput, device: str) -> RouterOutput:
    return RouterOutput(topk_ids=routing.topk_ids.to(device), topk_weights=routing.topk_weights.to(device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "auto"])
@pytest.mark.parametrize("gating", ["dropless", "capacity"])
@pytest.mark.parametrize("num_tokens", [1, 5, 300])
def test_cuda_backends_match_the_cpu_loop_reference(backend, dtype, gating, num_tokens):
    from moeserve.moe.backends import grouped_mm_supported

    if backend == "grouped_mm" and gating == "dropless" and not grouped_mm_supported(torch.device("cuda"), dtype):
        pytest.skip(f"this torch build's _grouped_mm does not take {dtype} on this GPU")
    experts, hidden, routing = _experts(dtype=dtype), _hidden(num_tokens, dtype), _routing(num_tokens, skew=1.0)
    config = MoEConfig(gating=gating, capacity_factor=1.0, backend=backend)
    # The reference: the plain loop on the CPU in float64 (no low-precision rounding inside).
    reference = MoELayer(
        ResidentExperts(experts.gate_up_proj.double(), experts.down_proj.double()), F.silu,
        MoEConfig(gating=gating, capacity_factor=1.0, backend="loop"),
    )(hidden.double(), routing)
    layer = MoELayer(_on(experts, "cuda"), F.silu, config)
    actual = layer(hidden.cuda(), _routing_on(routing, "cuda"))
    assert actual.device.type == "cuda" and actual.dtype == dtype
    error = float((actual.double().cpu() - reference).norm() / reference.norm())
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), f"relative error {error:.3g}"


def test_grouped_mm_support_is_probed_per_device_and_dtype():
    from moeserve.moe.backends import grouped_mm_available, grouped_mm_supported

    if not grouped_mm_available():
        pytest.skip("this torch build has no _grouped_mm")
    # The CPU build takes every float type (a loop in C++), and the answer is cached.
    assert grouped_mm_supported(torch.device("cpu"), torch.float32)
    assert grouped_mm_supported(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_skipping_zero_weight_assignments_changes_no_output_and_dispatches_only_the_rest(backend):
    """``skip_zero_weights``: zero-weight assignments get no row (their experts do nothing for
    them) and the layer's output is that of computing them and multiplying by 0 (up to rounding:
    a matmul over fewer rows may take another kernel)."""
    experts, hidden, routing = _experts(), _hidden(), _routing()
    weights = routing.topk_weights.clone()
    weights[::3, 1] = 0  # some second choices skipped
    weights[5] = 0  # one token with nothing left
    zeroed = RouterOutput(topk_ids=routing.topk_ids, topk_weights=weights, logits=routing.logits)
    skipping = RouterOutput(topk_ids=routing.topk_ids, topk_weights=weights, logits=routing.logits, skip_zero_weights=True)
    groups = dispatch_dropless(hidden, skipping, E)
    kept = int((weights != 0).sum())
    assert groups.rows.shape[0] == kept and int(groups.expert_counts.sum()) == kept
    assert torch.equal(groups.expert_counts, torch.bincount(routing.topk_ids[weights != 0], minlength=E))
    assert torch.equal(skipping.executed_ids(), routing.topk_ids[weights != 0])
    layer = MoELayer(experts, F.silu, MoEConfig(backend=backend))
    reference = MoELayer(experts, F.silu, MoEConfig(backend="loop"))
    torch.testing.assert_close(layer(hidden, skipping), layer(hidden, zeroed), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(hidden, skipping), reference(hidden, zeroed), rtol=1e-5, atol=1e-6)
    assert torch.all(layer(hidden, skipping)[5] == 0)
    nothing = RouterOutput(topk_ids=routing.topk_ids, topk_weights=torch.zeros_like(weights), skip_zero_weights=True)
    assert dispatch_dropless(hidden, nothing, E).rows.shape[0] == 0
    assert torch.equal(layer(hidden, nothing), torch.zeros_like(hidden))
