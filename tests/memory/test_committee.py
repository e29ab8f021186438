"""The parameter committee: masked gating, telemetry, the offline planner, the online scheduler.

Assertions are on values: with every expert a member the logits equal the full model's
(``torch.equal``); with a committee, no routed id outside it reaches dispatch (checked by an
observer, which sees the routing the layer executes); plans respect the budget.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moeserve.memory.committee import (
    CommitteeGate,
    CommitteePlan,
    CommitteeScheduler,
    allocate_members,
    apply_committee,
    remove_committee,
)
from moeserve.models.loader import MoEModel
from moeserve.moe.types import RouterOutput

PROMPT = 'import os\nimport sys\n\n\ndef main(argv):\n    """Print every argument."""\n    for name in argv:\n'


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt_ids(reference_model: MoEModel) -> torch.Tensor:
    ids = reference_model.tokenizer(PROMPT * 3)["input_ids"]
    return torch.tensor(ids[:96])  # [S]


def _logits(model: MoEModel, ids: torch.Tensor) -> torch.Tensor:
    return model.logits(ids[None])


def test_all_members_is_exact_and_fully_served(reference_model: MoEModel, prompt_ids: torch.Tensor) -> None:
    expected = _logits(reference_model, prompt_ids)
    everyone = {i: set(range(reference_model.num_experts)) for i in range(len(reference_model.layers))}
    gate = apply_committee(reference_model, everyone)
    try:
        got = _logits(reference_model, prompt_ids)
    finally:
        remove_committee(reference_model, gate)
    assert torch.equal(got, expected)
    telemetry = gate.telemetry()
    assert telemetry["served_exactly"] == 1.0
    assert all(layer["served_exactly"] == 1.0 and layer["rerouted_tokens"] == 0 for layer in telemetry["layers"].values())
    assert all(not layer.routing_transforms for layer in reference_model.layers)


def test_committee_routes_only_members(reference_model: MoEModel, prompt_ids: torch.Tensor) -> None:
    members = {i: {(i + 3 * j) % reference_model.num_experts for j in range(4)} for i in range(len(reference_model.layers))}
    seen: dict[int, set[int]] = {}
    weight_sums: list[torch.Tensor] = []

    def observe(layer: int, routing: RouterOutput) -> None:
        seen.setdefault(layer, set()).update(int(e) for e in routing.topk_ids.flatten().tolist())
        weight_sums.append(routing.topk_weights.sum(dim=-1))

    gate = apply_committee(reference_model, members)
    for layer in reference_model.layers:
        layer.observers.append(observe)
    try:
        _logits(reference_model, prompt_ids)
    finally:
        for layer in reference_model.layers:
            layer.observers.remove(observe)
        remove_committee(reference_model, gate)
    assert seen.keys() == members.keys()
    for layer, ids in seen.items():
        assert ids <= members[layer]
    # Mixtral renormalises its top-k weights: rerouted tokens too.
    torch.testing.assert_close(torch.cat(weight_sums), torch.ones(sum(w.numel() for w in weight_sums)))
    telemetry = gate.telemetry()
    assert 0.0 < telemetry["served_exactly"] < 1.0
    assert all(layer["rerouted_tokens"] > 0 for layer in telemetry["layers"].values())


def test_reroute_is_softmax_over_members_then_topk() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 1.0, 2.0, 3.0, 4.0]])  # [T=2, E=5]
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, 2, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    routing = RouterOutput(topk_ids=ids, topk_weights=weights, logits=logits)
    gate = CommitteeGate({0: {0, 1, 3}}, num_experts=5, top_k=2)
    out = gate(0, routing)
    # Token 0 routed to {0, 1}, both members: unchanged. Token 1 routed to {4, 3}: 4 is out.
    assert torch.equal(out.topk_ids[0], ids[0]) and torch.equal(out.topk_weights[0], weights[0])
    member_probs = torch.softmax(logits[1, [3, 1]], dim=-1)
    assert out.topk_ids[1].tolist() == [3, 1]
    torch.testing.assert_close(out.topk_weights[1], member_probs)
    expected_exact = float(weights[0].sum() + weights[1, 1]) / float(weights.sum())
    assert gate.telemetry()["served_exactly"] == pytest.approx(expected_exact)


def test_drop_fallback_and_skip_threshold() -> None:
    ids = torch.tensor([[0, 2], [1, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.95, 0.05]])
    routing = RouterOutput(topk_ids=ids, topk_weights=weights, logits=None)
    gate = CommitteeGate({0: {0, 1}}, num_experts=3, top_k=2, skip_threshold=0.1)
    out = gate(0, routing)
    assert out.topk_ids.shape == (2, 2) and set(out.topk_ids.flatten().tolist()) <= {0, 1}
    # Token 0: expert 2 dropped, expert 0 rescaled to the row's sum. Token 1: slot under 0.1 skipped.
    torch.testing.assert_close(out.topk_weights, torch.tensor([[1.0, 0.0], [0.95, 0.0]]))
    t = gate.telemetry()["layers"][0]
    assert t["skipped_slots"] == 2
    assert t["served_exactly"] == pytest.approx((0.7 + 0.95) / 2.0)


def test_apply_committee_rejects_bad_members(reference_model: MoEModel) -> None:
    layers = len(reference_model.layers)
    with pytest.raises(ValueError, match="no members for MoE layers"):
        apply_committee(reference_model, {0: {0, 1}})
    with pytest.raises(ValueError, match="at least top_k"):
        apply_committee(reference_model, {i: {0} for i in range(layers)})
    gate = apply_committee(reference_model, {i: {0, 1} for i in range(layers)})
    try:
        with pytest.raises(ValueError, match="already has a committee"):
            apply_committee(reference_model, {i: {0, 1} for i in range(layers)})
    finally:
        remove_committee(reference_model, gate)


def test_allocate_members_greedy_budget() -> None:
    mass = torch.tensor([[10.0, 0.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]])  # layer 0 peaked, layer 1 spread
    members = allocate_members(mass, total=5, min_per_layer=1)
    assert members == [[0], [0, 1, 2, 3]]
    assert allocate_members(mass, total=3, min_per_layer=1) == [[0], [0, 1]]
    with pytest.raises(ValueError, match="at least 2 each"):
        allocate_members(mass, total=3, min_per_layer=2)


def test_plan_budget_and_json_round_trip(reference_model: MoEModel, prompt_ids: torch.Tensor, tmp_path) -> None:
    from moeserve.memory.committee import plan_committee

    layers, experts, k = len(reference_model.layers), reference_model.num_experts, reference_model.top_k
    plan = plan_committee(reference_model, prompt_ids, budget_fraction=0.4, seq_len=48)
    assert plan.total_members == round(0.4 * layers * experts)
    assert all(len(m) >= k for m in plan.members)
    for members, mass in zip(plan.members, plan.gate_mass, strict=True):
        outside = [mass[e] for e in range(experts) if e not in members]
        assert min(mass[e] for e in members) >= max(outside, default=0.0)
    assert plan.calibration_tokens == prompt_ids.numel()
    path = tmp_path / "plan.json"
    plan.save(path)
    assert CommitteePlan.load(path, reference_model) == plan
    other = CommitteePlan(**{**plan.__dict__, "model_name": "other-moe", "num_experts": experts * 2})
    other.save(path)
    with pytest.raises(ValueError, match=r"model name 'other-moe' != 'tiny-moe'; num_experts 32 != 16"):
        CommitteePlan.load(path, reference_model)
    with pytest.raises(ValueError, match="at least"):
        plan_committee(reference_model, prompt_ids[:8], budget_fraction=0.05)


def test_scheduler_swaps_toward_recent_mass(reference_model: MoEModel) -> None:
    layers, experts = len(reference_model.layers), reference_model.num_experts
    gate = apply_committee(reference_model, {i: {0, 1, 2} for i in range(layers)})
    scheduler = CommitteeScheduler(reference_model, gate, decay=0.5, max_swaps=1)
    try:
        assert reference_model.layers[0].routing_transforms[0] is not gate  # the recorder sees the raw routing
        hot = RouterOutput(topk_ids=torch.tensor([[5, 6]] * 4), topk_weights=torch.full((4, 2), 0.5))
        for _ in range(3):
            for i in range(layers):
                for transform in reference_model.layers[i].routing_transforms:
                    transform(i, hot)
            swaps = scheduler.step()
            assert swaps <= layers  # at most one per layer
        assert all(gate.members(i) >= {5, 6} and len(gate.members(i)) == 3 for i in range(layers))
        assert scheduler.ema.shape == (layers, experts)
    finally:
        scheduler.close()
        remove_committee(reference_model, gate)
    assert all(not layer.routing_transforms for layer in reference_model.layers)


def _feed(model: MoEModel, routing: RouterOutput) -> None:
    """Run every layer's routing transforms on ``routing`` (what a forward pass does before dispatch)."""
    for i, layer in enumerate(model.layers):
        for transform in layer.routing_transforms:
            transform(i, routing)


def test_scheduler_margin_holds_near_ties_and_lets_clear_winners_in(reference_model: MoEModel) -> None:
    layers = len(reference_model.layers)
    gate = apply_committee(reference_model, {i: {0, 1, 2} for i in range(layers)})
    scheduler = CommitteeScheduler(reference_model, gate, decay=0.0, max_swaps=1, margin=0.5)
    try:
        # Expert 5 gets 1.25x member 2's mass: inside the 50% margin, no swap.
        near = RouterOutput(topk_ids=torch.tensor([[0, 1], [2, 5]] * 4), topk_weights=torch.tensor([[0.5, 0.5], [4 / 9, 5 / 9]] * 4))
        _feed(reference_model, near)
        assert scheduler.step() == 0 and all(gate.members(i) == {0, 1, 2} for i in range(layers))
        # Twice member 2's mass: past the margin, 5 replaces 2 (the weakest member).
        clear = RouterOutput(topk_ids=torch.tensor([[0, 1], [2, 5]] * 4), topk_weights=torch.tensor([[0.5, 0.5], [1 / 3, 2 / 3]] * 4))
        _feed(reference_model, clear)
        assert scheduler.step() == layers and all(gate.members(i) == {0, 1, 5} for i in range(layers))
    finally:
        scheduler.close()
        remove_committee(reference_model, gate)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        CommitteeScheduler(reference_model, gate, margin=-0.1)


def test_scheduler_with_a_cache_swaps_asynchronously(reference_model: MoEModel) -> None:
    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache

    layers = len(reference_model.layers)
    gate = apply_committee(reference_model, {i: {0, 1, 2} for i in range(layers)})
    cache = apply_expert_cache(reference_model, "18.75%", "lru", per_layer=True)  # 3 of 16 experts per layer
    scheduler = CommitteeScheduler(reference_model, gate, decay=0.5, max_swaps=1, cache=cache)
    try:
        hot = RouterOutput(topk_ids=torch.tensor([[5, 0]] * 4), topk_weights=torch.full((4, 2), 0.5))
        _feed(reference_model, hot)
        assert scheduler.step() == 0  # expert 5 is not resident: nothing completes yet
        for i in range(layers):
            assert scheduler.incoming[i] == {5}
            assert gate.members(i) == {0, 1}  # the leaving member (lowest average, highest id) left at once
        cache.wait_for_prefetch()
        assert all(cache.is_resident(i, 5) for i in range(layers))
        _feed(reference_model, hot)
        assert scheduler.step() == layers  # landed: every layer's swap completes
        assert all(gate.members(i) == {0, 1, 5} and not scheduler.incoming[i] for i in range(layers))
        assert scheduler.swaps == scheduler.swaps_started == layers
        assert cache.stats().max_resident_bytes <= cache.budget_bytes
    finally:
        scheduler.close()
        remove_expert_cache(reference_model, cache)
        remove_committee(reference_model, gate)


def test_scheduler_steps_itself_during_generation(reference_model: MoEModel) -> None:
    from moeserve.config import SamplingConfig
    from moeserve.engine.generate import generate
    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache

    layers = len(reference_model.layers)
    sampling = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    outputs = {}
    for swaps in (0, 2):
        gate = apply_committee(reference_model, {i: set(range(8)) for i in range(layers)})
        cache = apply_expert_cache(reference_model, "50%", "lru", per_layer=True)
        scheduler = CommitteeScheduler(reference_model, gate, max_swaps=swaps, cache=cache, step_every=1)
        try:
            outputs[swaps] = generate(reference_model, PROMPT, sampling).token_ids
            cache.wait_for_prefetch()
            stats = cache.stats()
            assert stats.max_resident_bytes <= cache.budget_bytes
            assert scheduler._forwards == 12  # one prefill and 11 decode steps, each stepped the scheduler
            assert all(len(gate.members(i)) >= reference_model.top_k for i in range(layers))
            if swaps == 0:
                assert scheduler.swaps_started == 0 and all(gate.members(i) == set(range(8)) for i in range(layers))
            else:
                assert scheduler.swaps_started > 0  # the prompt's mass lies outside experts 0-7 somewhere
        finally:
            scheduler.close()
            remove_expert_cache(reference_model, cache)
            remove_committee(reference_model, gate)
    assert len(outputs[0]) == len(outputs[2]) == 12


def test_scheduler_without_a_cache_swaps_a_top_k_sized_committee(reference_model: MoEModel) -> None:
    layers = len(reference_model.layers)
    gate = apply_committee(reference_model, {i: {0, 1} for i in range(layers)})  # exactly top_k members
    scheduler = CommitteeScheduler(reference_model, gate, decay=0.5, max_swaps=2)
    try:
        _feed(reference_model, RouterOutput(topk_ids=torch.tensor([[7, 8]] * 4), topk_weights=torch.full((4, 2), 0.5)))
        assert scheduler.step() == 2 * layers  # immediate swaps keep the size: both members replaced
        assert all(gate.members(i) == {7, 8} for i in range(layers))
    finally:
        scheduler.close()
        remove_committee(reference_model, gate)


def _slow_background_reads(cache, seconds: float = 0.01) -> None:
    """Make ``cache``'s expert reads off the main thread (the background loader's) take ``seconds`` longer."""
    import threading
    import time

    read = cache.store.read_expert_into

    def slow_in_background(*args):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(seconds)
        return read(*args)

    cache.store.read_expert_into = slow_in_background


def test_steps_and_background_loads_of_the_same_experts_keep_every_slot_accounted(reference_model: MoEModel) -> None:
    """A step that waits for room while background loads bring in its own experts loads only the rest.

    The background reads are slowed so a step waits while they run (timing-dependent: the race
    this guards was a slot leaked when the step loaded an expert a background load had just
    made resident); the accounting must hold whatever the interleaving.
    """
    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache

    for _ in range(5):
        cache = apply_expert_cache(reference_model, "12.5%", "lru")  # one pool of 8 slots for 4 layers
        _slow_background_reads(cache)
        pool = cache._pool_of[0]
        try:
            cache.observe(1, RouterOutput(topk_ids=torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]),
                                          topk_weights=torch.full((4, 2), 0.5)))
            cache.observe(2, RouterOutput(topk_ids=torch.tensor([[9, 8]]), topk_weights=torch.full((1, 2), 0.5)))
            for expert in (5, 1, 0, 3):
                cache.load_in_background(0, expert)
            cache.observe(0, RouterOutput(topk_ids=torch.tensor([[0, 1]]), topk_weights=torch.full((1, 2), 0.5)))
            cache.wait_for_prefetch()
            assert sorted(pool.free + list(pool.key2slot.values())) == list(range(len(pool.gate_up)))
            assert len(pool.gate_up) <= pool.capacity and cache.resident_bytes == len(pool.key2slot) * pool.slot_bytes
            assert cache.is_resident(0, 0) and cache.is_resident(0, 1)
        finally:
            remove_expert_cache(reference_model, cache)


def test_a_step_waits_for_every_one_of_its_experts_a_background_load_starts(reference_model: MoEModel) -> None:
    """While a step waits for one of its experts to land, the loader may start another of them;
    the step must wait for that one too rather than read it a second time (timing-dependent
    like the test above: background reads are slowed; the accounting must hold either way)."""
    import time

    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache

    for _ in range(5):
        cache = apply_expert_cache(reference_model, "50%", "lru")  # room for all: nothing is evicted
        _slow_background_reads(cache)
        pool = cache._pool_of[0]
        try:
            for expert in (5, 6, 7):
                cache.load_in_background(0, expert)
            time.sleep(0.002)  # the first background read is under way
            cache.observe(0, RouterOutput(topk_ids=torch.tensor([[5, 6], [7, 5]]), topk_weights=torch.full((2, 2), 0.5)))
            cache.wait_for_prefetch()
            assert sorted(pool.free + list(pool.key2slot.values())) == list(range(len(pool.gate_up)))
            assert cache.stats().loads == 3 and len(pool.key2slot) == 3  # each expert read once
        finally:
            remove_expert_cache(reference_model, cache)


@pytest.mark.parametrize("softmax_router", [True, False])
@pytest.mark.parametrize("skip_threshold", [0.0, 0.2])
def test_the_accelerator_path_routes_and_counts_like_the_reference(softmax_router: bool, skip_threshold: float) -> None:
    """The gate's sync-free path (what runs on a GPU) is run here on the CPU directly: the same
    routing as the reference path, bit for bit, and the same telemetry once it is read."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 8, generator=generator)  # [T, E]
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    routing = RouterOutput(topk_ids=ids, topk_weights=weights, logits=logits)
    members = {0: {1, 2, 5}, 1: set(range(8))}  # layer 1: every expert (nothing rerouted)
    reference = CommitteeGate(members, 8, 2, skip_threshold=skip_threshold, softmax_router=softmax_router)
    fast = CommitteeGate(members, 8, 2, skip_threshold=skip_threshold, softmax_router=softmax_router)
    for layer in (0, 1, 0):
        want, got = reference(layer, routing), fast._call_without_sync(layer, routing)
        assert torch.equal(got.topk_ids, want.topk_ids) and torch.equal(got.topk_weights, want.topk_weights)
    want_t, got_t = reference.telemetry(), fast.telemetry()
    assert got_t["served_exactly"] == pytest.approx(want_t["served_exactly"], rel=1e-12)
    for layer in (0, 1):
        for name in ("tokens", "rerouted_tokens", "skipped_slots"):
            assert got_t["layers"][layer][name] == want_t["layers"][layer][name], (layer, name)
        for name in ("routed_mass", "exact_mass"):
            assert got_t["layers"][layer][name] == pytest.approx(want_t["layers"][layer][name], rel=1e-12)
    fast.reset_telemetry()
    assert fast.telemetry()["served_exactly"] == 1.0


@pytest.mark.gpu
def test_the_gate_on_cuda_matches_the_cpu_gate() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 16, generator=generator)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
    routing = RouterOutput(topk_ids=ids, topk_weights=weights / weights.sum(-1, keepdim=True), logits=logits)
    on_gpu = RouterOutput(topk_ids=routing.topk_ids.cuda(), topk_weights=routing.topk_weights.cuda(), logits=logits.cuda())
    cpu_gate, gpu_gate = CommitteeGate({0: set(range(0, 16, 2))}, 16, 2), CommitteeGate({0: set(range(0, 16, 2))}, 16, 2)
    want, got = cpu_gate(0, routing), gpu_gate(0, on_gpu)
    assert torch.equal(got.topk_ids.cpu(), want.topk_ids)
    torch.testing.assert_close(got.topk_weights.cpu(), want.topk_weights)
    assert gpu_gate.telemetry()["served_exactly"] == pytest.approx(cpu_gate.telemetry()["served_exactly"], rel=1e-6)


def test_plan_ranks_members_by_calibration_gate_mass() -> None:
    plan = CommitteePlan("m", 4, 2, 2, 0.75, members=[[0, 1, 3], [1, 2, 3]],
                         gate_mass=[[0.1, 0.5, 0.0, 0.4], [0.0, 0.2, 0.2, 0.6]])
    assert plan.ranked_members() == {0: [1, 3, 0], 1: [3, 1, 2]}
    assert CommitteePlan("m", 4, 1, 2, 0.5, members=[[3, 0]]).ranked_members() == {0: [0, 3]}


def test_warm_in_serves_resident_members_while_the_rest_load_in_the_background(reference_model: MoEModel) -> None:
    """From a cold cache a committee starts with top_k members per layer (the best planned), the
    other planned members load in the background and join once resident; no expert outside the
    committee of the moment reaches dispatch, and nothing but planned members is ever loaded."""
    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache

    layers, top_k = len(reference_model.layers), reference_model.top_k
    ranked = {i: [(3 * i + j) % 16 for j in range(8)] for i in range(layers)}  # 8 planned members, best first
    gate = apply_committee(reference_model, {i: set(r) for i, r in ranked.items()})
    cache = apply_expert_cache(reference_model, "50%", "lru", per_layer=True)  # room for the 8
    _slow_background_reads(cache, 0.05)
    routed: list[tuple[int, set[int]]] = []
    seen = _Recorder(routed)
    for layer in reference_model.layers:
        layer.observers.append(seen)
    gate.scheduler = scheduler = CommitteeScheduler(reference_model, gate, max_swaps=0, cache=cache, warm_in=ranked)
    try:
        for i in range(layers):
            assert gate.members(i) == set(ranked[i][:top_k])
            assert scheduler.warming[i] == ranked[i][top_k:]
        hot = RouterOutput(topk_ids=torch.tensor([[ranked[0][7], ranked[0][6]]] * 3), topk_weights=torch.full((3, 2), 0.5))
        for i, layer in enumerate(reference_model.layers):
            layer(torch.randn(3, reference_model.config.hidden_size), hot)  # routed to members of the moment only
            assert routed[-1][1] <= gate.members(i)
        assert scheduler.step() == 0  # no swaps (max_swaps=0), members join as they land
        cache.wait_for_prefetch()
        scheduler.step()
        for i in range(layers):
            assert gate.members(i) == set(ranked[i]) and not scheduler.warming[i]
        assert scheduler.warm_in_joined == layers * (8 - top_k)
        report = gate.telemetry()["scheduler"]
        assert report["warm_in_joined"] == layers * (8 - top_k) and report["warm_in_loading"] == 0
        stats = cache.stats()
        # Background loads of the 6 others per layer, plus the seeds a step used (a token whose
        # routing names non-members is served by the members; without logits, by the first one).
        assert stats.loads == layers * (8 - top_k) + stats.misses and stats.evictions == 0
        for i in range(layers):
            assert set(ranked[i][top_k:]) <= set(cache.views[i].resident_experts()) <= set(ranked[i])
        assert stats.max_resident_bytes <= cache.budget_bytes
    finally:
        for layer in reference_model.layers:
            layer.observers.remove(seen)
        scheduler.close()
        remove_expert_cache(reference_model, cache)
        remove_committee(reference_model, gate)


class _Recorder:
    def __init__(self, into: list[tuple[int, set[int]]]) -> None:
        self.into = into

    def __call__(self, layer: int, routing: RouterOutput) -> None:
        self.into.append((layer, set(routing.topk_ids.flatten().tolist())))


def test_warm_in_needs_a_cache(reference_model: MoEModel) -> None:
    gate = apply_committee(reference_model, {i: {0, 1, 2} for i in range(len(reference_model.layers))})
    try:
        with pytest.raises(ValueError, match="warm_in needs an expert cache"):
            CommitteeScheduler(reference_model, gate, warm_in={0: [0, 1, 2]})
        assert all(layer.routing_transforms == [gate] for layer in reference_model.layers)
    finally:
        remove_committee(reference_model, gate)


def test_skipped_slots_run_and_load_no_expert(reference_model: MoEModel) -> None:
    """A slot under the skip threshold gets weight 0 and is marked skipped: dispatch gives it no
    row and an expert cache does not load its expert for it."""
    from moeserve.memory.offload import apply_expert_cache, remove_expert_cache
    from moeserve.moe.gating import dispatch_dropless

    layers = len(reference_model.layers)
    gate = CommitteeGate({i: set(range(16)) for i in range(layers)}, 16, 2, skip_threshold=0.3)
    routing = RouterOutput(topk_ids=torch.tensor([[3, 7], [3, 9], [4, 3]]),
                           topk_weights=torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.9, 0.1]]))
    routed = gate(0, routing)
    assert routed.skip_zero_weights and routed.executed_ids().tolist() == [3, 3, 9, 4]
    hidden = torch.randn(3, reference_model.config.hidden_size)
    groups = dispatch_dropless(hidden, routed, 16)
    assert groups.rows.shape[0] == 4 and groups.expert_counts[7] == 0 and groups.expert_counts[3] == 2
    assert gate.telemetry()["layers"][0]["skipped_slots"] == 2
    cache = apply_expert_cache(reference_model, "100%", "lru")
    try:
        cache.observe(0, routed)
        assert cache.views[0].resident_experts() == [3, 4, 9]  # 7 was only ever a skipped slot
    finally:
        remove_expert_cache(reference_model, cache)
