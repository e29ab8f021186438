"""The ``predicted-reuse-context`` eviction policy: cache invariants, exact hit counts, determinism, causality.

A reference loop drives the policy through the step protocol on its own (not through
``replay``) and checks, after every step, that the cache holds at most ``capacity`` keys, that
every victim was resident and unpinned, and that hits are exactly the requested keys found
resident; ``replay`` must count the same. Assertions are on counts, never timings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from moeserve.memory.cache_sim import replay, simulate
from moeserve.memory.policies import (
    EVICTION_POLICIES,
    ContextReusePolicy,
    StreamContext,
    context_features,
)
from moeserve.traces.format import Trace, TraceMeta


def random_stream(seed: int, num_steps: int, num_keys: int = 16, width: int = 2) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_keys + 1)
    popularity /= popularity.sum()
    return [rng.choice(num_keys, size=width, replace=False, p=popularity).tolist() for _ in range(num_steps)]


def random_context(seed: int, num_steps: int, num_keys: int = 16, width: int = 2) -> StreamContext:
    rng = np.random.default_rng(seed)
    starts = rng.random(num_steps) < 0.02
    starts[0] = True
    previous = np.stack([rng.permutation(num_keys)[:width] for _ in range(num_steps)])  # [n, K]
    previous[rng.random(previous.shape) < 0.05] = -1
    return StreamContext(sequence_starts=starts, previous_layer=previous)


def previous_of(context: StreamContext) -> np.ndarray:
    assert context.previous_layer is not None
    return context.previous_layer


def reference_hits(steps: Sequence[Sequence[int]], capacity: int, context: StreamContext | None) -> list[int]:
    """Drive a fresh policy step by step, checking the cache's invariants after every step."""
    policy = ContextReusePolicy(capacity)
    policy.prepare(steps, context)
    resident: set[int] = set()
    hits = []
    for time, keys in enumerate(steps):
        found = [key for key in keys if key in resident]
        missing = [key for key in keys if key not in resident]
        overflow = len(resident) + len(missing) - capacity
        if overflow > 0:
            victims = policy.evict(overflow, keys, time)
            assert len(set(victims)) == overflow
            assert all(victim in resident and victim not in keys for victim in victims)
            resident.difference_update(victims)
        resident.update(missing)
        policy.on_step(keys, missing, time)
        assert len(resident) <= capacity
        assert set(keys) <= resident
        hits.append(len(found))
    return hits


@pytest.mark.parametrize("capacity", [2, 5, 9])
def test_capacity_holds_and_hits_are_counted_exactly(capacity: int) -> None:
    steps = random_stream(1, 1300)
    context = random_context(2, 1300)
    expected = reference_hits(steps, capacity, context)
    assert replay(steps, ContextReusePolicy(capacity), capacity, context) == expected
    assert 0 < sum(expected) < sum(len(keys) for keys in steps)


def test_deterministic() -> None:
    steps = random_stream(3, 1200)
    context = random_context(4, 1200)
    runs = [replay(steps, ContextReusePolicy(5), 5, context) for _ in range(2)]
    assert runs[0] == runs[1]


def test_without_context_it_is_predicted_reuse() -> None:
    steps = random_stream(5, 1100)
    plain = replay(steps, EVICTION_POLICIES.get("predicted-reuse")(5), 5)
    assert replay(steps, ContextReusePolicy(5), 5) == plain
    assert replay(steps, ContextReusePolicy(5), 5, None) == plain


def test_future_steps_and_context_do_not_move_the_past() -> None:
    # Same first 900 steps and context; a different future (keys, request starts, previous
    # layer): the hits of the first 900 steps must not change. 1500 steps span several refits.
    prefix = random_stream(6, 900)
    steps_a, steps_b = prefix + random_stream(7, 600), prefix + random_stream(8, 600)
    context_a, context_b = random_context(9, 1500), random_context(9, 1500)
    other = random_context(10, 1500)
    context_b = StreamContext(
        sequence_starts=np.concatenate([context_a.sequence_starts[:900], other.sequence_starts[900:]]),
        previous_layer=np.concatenate([previous_of(context_a)[:900], previous_of(other)[900:]]),
    )
    hits_a = replay(steps_a, ContextReusePolicy(5), 5, context_a)
    hits_b = replay(steps_b, ContextReusePolicy(5), 5, context_b)
    assert hits_a[:900] == hits_b[:900]


def test_context_features_are_causal() -> None:
    ids = np.array(random_stream(11, 1400, width=2))
    context = random_context(12, 1400)
    other_ids = ids.copy()
    other_ids[1000:] = np.array(random_stream(13, 400, width=2))
    other_context = random_context(14, 1400)
    changed = StreamContext(
        sequence_starts=np.concatenate(
            [context.sequence_starts[:1000], other_context.sequence_starts[1000:]]
        ),
        previous_layer=np.concatenate([previous_of(context)[:1000], previous_of(other_context)[1000:]]),
    )
    for a, b in zip(
        context_features(ids, 16, context), context_features(other_ids, 16, changed), strict=True
    ):
        np.testing.assert_array_equal(a[:1000], b[:1000])


def test_the_previous_layer_raises_the_score_of_the_next_step() -> None:
    # Each step's key is uniform over 16, and the previous layer's id at step t names the key of
    # step t+1: only the context tells which key comes next, so its score must rise to the top.
    rng = np.random.default_rng(15)
    num_steps, num_keys = 2000, 16
    keys = rng.integers(0, num_keys, size=num_steps)  # [n]
    steps = [[int(key)] for key in keys]
    previous = np.append(keys[1:], 0)[:, None]  # [n, 1]
    context = StreamContext(sequence_starts=np.zeros(num_steps, dtype=bool), previous_layer=previous)

    def next_key_first(policy: ContextReusePolicy, given: StreamContext | None) -> float:
        policy.prepare(steps, given)
        rows = np.array(policy._rows)[1024:-1]  # [m, E] after the first refits
        return float(np.mean(rows.argmax(axis=1) == keys[1025:]))

    assert next_key_first(ContextReusePolicy(4), context) > 0.9
    assert next_key_first(ContextReusePolicy(4), None) < 0.3


def test_stream_context_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="1-D"):
        StreamContext(sequence_starts=np.zeros((3, 1), dtype=bool))
    with pytest.raises(ValueError, match="previous_layer"):
        StreamContext(
            sequence_starts=np.zeros(3, dtype=bool), previous_layer=np.zeros((4, 2), dtype=np.int64)
        )
    policy = ContextReusePolicy(4)
    with pytest.raises(ValueError, match="covers 2 steps"):
        policy.prepare([[0, 1], [2, 3], [1, 2]], StreamContext(sequence_starts=np.zeros(2, dtype=bool)))


def test_simulate_gives_each_layer_its_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # Per layer, simulate hands every policy the trace's sequence starts and the same token's
    # experts at the previous layer (none for the first); the global scope hands none.
    seen: list[StreamContext | None] = []
    original = ContextReusePolicy._scores

    def recording(self, ids, num_keys, horizon, context):  # type: ignore[no-untyped-def]
        seen.append(context)
        return original(self, ids, num_keys, horizon, context)

    monkeypatch.setattr(ContextReusePolicy, "_scores", recording)
    rng = np.random.default_rng(16)
    tokens, layers, experts = 600, 3, 8
    ids = np.stack([np.stack([rng.permutation(experts)[:2] for _ in range(layers)]) for _ in range(tokens)])
    ids[5, 1, 0] = -1  # unknown routing stays unknown in the context
    trace = Trace(
        experts=ids.astype(np.int16),  # [T, L, 2]
        offsets=np.array([0, 250, 251, tokens], dtype=np.int64),
        meta=TraceMeta(model="test/random", num_experts=experts, top_k=2, phase="decode", source="unit test"),
    )
    assert EVICTION_POLICIES.get("predicted-reuse-context").online
    result = simulate(trace, "predicted-reuse-context", 4)
    assert len(seen) == layers
    for layer, context in enumerate(seen):
        assert context is not None
        assert np.flatnonzero(context.sequence_starts).tolist() == [0, 250, 251]
        if layer == 0:
            assert context.previous_layer is None
        else:
            assert context.previous_layer is not None
            np.testing.assert_array_equal(context.previous_layer, ids[:, layer - 1])
    assert (result.hits + result.misses).sum() == (ids >= 0).sum()
    seen.clear()
    simulate(trace, "predicted-reuse-context", 4, scope="global")
    assert seen == []  # several streams: predicted-reuse's per-stream scores, no context
