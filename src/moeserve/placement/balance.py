"""Expert -> rank placement per MoE layer: greedy load balancing, anti-correlation, replication.

Expert parallelism spreads each MoE layer's experts over R ranks, and a step lasts as long as
its busiest rank, so a placement aims at equal rank loads. The policies follow Huang et al.
(arXiv 2303.06182: place experts greedily from historical loads, keep experts that fire
together apart) and DeepSeek's EPLB (give extra physical slots to the experts with the highest
load per replica, then pack the physical experts onto ranks with equal slot counts). At run
time each token picks, among its expert's replicas, the one on the rank with the shortest queue.

Shape legend: T tokens, L MoE layers, k experts per token (top_k), E logical experts,
P physical experts (E plus the extra replicas), R ranks, M most replicas of one expert.
Mapping arrays are named ``a2b``: ``expert2rank`` [E], ``phy2log`` [P], ``physical2rank`` [P],
``log2phy`` [E, M] (padded with -1).

A load counts token assignments: a token routed to k experts adds one to each of them.
Balancedness is ``mean / max`` of the rank loads (1.0 = perfectly even). Every function is pure
(inputs are never modified) and knows nothing of models, tensors or processes; applying a plan
is ``moeserve.parallel``'s business. Bad user input raises ``ValueError`` naming the value.
Imports numpy and the trace format only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeserve.traces.format import OFFSETS_DTYPE, UNKNOWN_EXPERT, Trace

DEFAULT_TRAIN_FRACTION = 0.5
"""Share of a trace's sequences (the first ones) a plan is fitted on; the rest evaluate it."""
DEFAULT_STEP_TOKENS = 256
"""Tokens per step (one batch through a layer) when :func:`plan_placement` replays held-out routing."""
DEFAULT_REFINE_ITERATIONS = 64
"""Most swaps :func:`refine_anticorrelated` makes per layer in :func:`plan_placement`."""
DEFAULT_LOAD_TOLERANCE = 0.0
"""How much (as a fraction) anti-correlation swaps may raise the busiest rank's fitted load."""


# --------------------------------------------------------------------------------------------
# Statistics of a trace


def expert_loads(trace: Trace) -> np.ndarray:
    """int64 [L, E]: how many tokens each MoE layer routed to each expert; -1 entries skipped."""
    experts = trace.experts  # [T, L, k]
    num_layers, num_experts = trace.num_layers, trace.meta.num_experts
    known = experts != UNKNOWN_EXPERT  # [T, L, k]
    layer_of_entry = np.broadcast_to(np.arange(num_layers)[None, :, None], experts.shape)  # [T, L, k]
    codes = layer_of_entry[known] * num_experts + experts[known].astype(np.int64)  # [N]
    counts = np.bincount(codes, minlength=num_layers * num_experts)  # [L*E]
    return counts.reshape(num_layers, num_experts).astype(np.int64)


def coactivation(trace: Trace) -> np.ndarray:
    """int64 [L, E, E]: entry [l, i, j] counts tokens routed to both i and j at layer l (i != j).

    Symmetric with a zero diagonal; -1 entries are skipped and a token naming an expert twice
    counts once.
    """
    num_experts = trace.meta.num_experts
    ids = np.sort(trace.experts.astype(np.int64), axis=2)  # [T, L, k], each row ascending
    # A repeated id within a row becomes unknown, so that the pair is counted once per token.
    repeated = np.zeros(ids.shape, dtype=bool)  # [T, L, k]
    repeated[:, :, 1:] = ids[:, :, 1:] == ids[:, :, :-1]
    ids[repeated] = UNKNOWN_EXPERT
    num_layers, top_k = ids.shape[1], ids.shape[2]
    layer_offset = (np.arange(num_layers) * num_experts * num_experts)[None, :]  # [1, L]
    codes = []
    for slot_a in range(top_k):
        for slot_b in range(slot_a + 1, top_k):
            first, second = ids[:, :, slot_a], ids[:, :, slot_b]  # [T, L] each
            both = (first != UNKNOWN_EXPERT) & (second != UNKNOWN_EXPERT)  # [T, L]
            codes.append((layer_offset + first * num_experts + second)[both])
    size = num_layers * num_experts * num_experts
    counts = np.bincount(np.concatenate(codes), minlength=size) if codes else np.zeros(size, np.int64)
    pairs = counts.reshape(num_layers, num_experts, num_experts).astype(np.int64)  # [L, E, E], upper
    return pairs + pairs.transpose(0, 2, 1)


# --------------------------------------------------------------------------------------------
# Policies on one layer's arrays


def balancedness(rank_loads: np.ndarray) -> float:
    """``mean / max`` of rank_loads [R]: 1.0 when even, 1/R when one rank takes everything.

    NaN when every rank's load is zero (nothing to balance). Raises ValueError for an empty,
    non-1-D, negative or non-finite array.
    """
    loads = _check_loads(rank_loads, "rank_loads")
    busiest = float(loads.max())
    return float(loads.mean()) / busiest if busiest > 0 else math.nan


def rank_loads(loads: np.ndarray, item2rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """float64 [R]: the summed loads [N] of the items (experts or physical experts) on each rank."""
    item_loads = _check_loads(loads, "loads")
    num_ranks = _check_int("num_ranks", num_ranks, minimum=1)
    mapping = _check_mapping(item2rank, "item2rank", len(item_loads), num_ranks)
    return np.bincount(mapping, weights=item_loads, minlength=num_ranks).astype(np.float64)


def greedy_placement(loads: np.ndarray, num_ranks: int, capacity_per_rank: int | None = None) -> np.ndarray:
    """expert2rank int64 [E]: experts with loads [E] on num_ranks ranks, busiest rank kept light.

    Longest processing time first: experts in decreasing load (ties: lower id first) each go to
    the least-loaded rank that still has a free slot (ties: fewer experts, then lower rank id).
    Each rank has ``capacity_per_rank`` slots, by default ceil(E / R), so every rank holds the
    same number of experts when R divides E. Greedy, not optimal in general; without a slot
    limit its busiest rank is within 4/3 of the optimum (Graham, 1969).

    Raises ValueError unless 1 <= num_ranks <= E and capacity_per_rank * num_ranks >= E.
    """
    expert_load = _check_loads(loads, "loads")  # [E]
    num_experts = len(expert_load)
    num_ranks = _check_int("num_ranks", num_ranks, minimum=1)
    if num_ranks > num_experts:
        raise ValueError(f"num_ranks is {num_ranks}, more than the {num_experts} experts to place")
    if capacity_per_rank is None:
        capacity_per_rank = -(-num_experts // num_ranks)
    capacity_per_rank = _check_int("capacity_per_rank", capacity_per_rank, minimum=1)
    if capacity_per_rank * num_ranks < num_experts:
        raise ValueError(
            f"capacity_per_rank {capacity_per_rank} x {num_ranks} ranks cannot hold {num_experts} experts"
        )
    return _pack(expert_load, num_ranks, capacity_per_rank, groups=None)


def same_rank_coactivation(expert2rank: np.ndarray, coactivation: np.ndarray) -> float:
    """Co-activation mass kept on one rank: sum over pairs i < j on the same rank of coactivation[i, j].

    expert2rank [E] and a symmetric coactivation [E, E] (its diagonal is ignored). With token
    co-activation counts this is the number of (token, pair of its experts) landing on one rank.
    """
    mapping = np.asarray(expert2rank)
    mapping = _check_mapping(mapping, "expert2rank", mapping.shape[0] if mapping.ndim else 0, None)  # [E]
    pair_counts = _check_coactivation(coactivation, len(mapping))  # [E, E]
    same_rank = mapping[:, None] == mapping[None, :]  # [E, E]
    np.fill_diagonal(same_rank, False)
    return float(pair_counts[same_rank].sum()) / 2.0


def refine_anticorrelated(
    expert2rank: np.ndarray,
    loads: np.ndarray,
    coactivation: np.ndarray,
    iterations: int = DEFAULT_REFINE_ITERATIONS,
    load_tolerance: float = DEFAULT_LOAD_TOLERANCE,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """expert2rank int64 [E]: the placement after up to ``iterations`` load-safe swaps apart.

    Objective, minimised: ``same_rank_coactivation(expert2rank, coactivation)``, i.e.
    ``sum_r sum_{i<j, rank(i) = rank(j) = r} coactivation[i, j]``. A token whose experts share a
    rank loads that rank several times in the same step, so co-firing experts are better apart.
    Constraint: the busiest rank's load (from loads [E]) never exceeds ``(1 + load_tolerance)``
    times the busiest rank's load of the input placement.

    Each iteration applies the swap of two experts on different ranks that lowers the objective
    most while meeting the constraint (swaps keep every rank's expert count); it stops early when
    no swap helps. ``groups`` [E] (optional): experts with equal group ids (replicas of one
    logical expert) are never swapped onto a rank that holds another member of their group.
    The input placement may break that rule; refinement never makes it worse.

    Raises ValueError for mismatched shapes, negative ``iterations`` or ``load_tolerance``.
    """
    expert_load = _check_loads(loads, "loads")  # [E]
    num_experts = len(expert_load)
    mapping = _check_mapping(expert2rank, "expert2rank", num_experts, num_ranks=None).copy()  # [E]
    pair_counts = _check_coactivation(coactivation, num_experts).copy()  # [E, E]
    np.fill_diagonal(pair_counts, 0.0)
    iterations = _check_int("iterations", iterations, minimum=0)
    if not math.isfinite(load_tolerance) or load_tolerance < 0:
        raise ValueError(f"load_tolerance must be a finite number >= 0, got {load_tolerance!r}")
    group_of = _check_groups(groups, num_experts)  # [E]
    num_ranks = int(mapping.max()) + 1
    load_per_rank = np.bincount(mapping, weights=expert_load, minlength=num_ranks)  # [R]
    # A small slack so that swaps of equal loads are not refused for rounding.
    load_limit = float(load_per_rank.max()) * (1.0 + load_tolerance) * (1.0 + 1e-12)
    for _ in range(iterations):
        # 1. attraction[e, r]: co-activation between e and the experts on rank r (e excluded).
        on_rank = np.zeros((num_experts, num_ranks))  # [E, R]
        on_rank[np.arange(num_experts), mapping] = 1.0
        attraction = pair_counts @ on_rank  # [E, R]
        own = attraction[np.arange(num_experts), mapping]  # [E]
        # 2. gain[a, b]: objective change if a and b trade ranks.
        toward = attraction[:, mapping]  # [E, E]: attraction of a to b's rank
        gain = toward + toward.T - own[:, None] - own[None, :] - 2.0 * pair_counts  # [E, E]
        # 3. allowed swaps: different ranks, both new rank loads within the limit, groups apart.
        new_load = load_per_rank[mapping][:, None] - expert_load[:, None] + expert_load[None, :]  # [E, E]
        allowed = (
            (mapping[:, None] != mapping[None, :]) & (new_load <= load_limit) & (new_load.T <= load_limit)
        )
        if group_of is not None:
            members = np.zeros((int(group_of.max()) + 1, num_ranks), dtype=np.int64)  # [G, R]
            np.add.at(members, (group_of, mapping), 1)
            lands_apart = members[group_of][:, mapping] == 0  # [E, E]: a's group absent from b's rank
            allowed &= lands_apart & lands_apart.T & (group_of[:, None] != group_of[None, :])
        gain = np.where(allowed, gain, np.inf)
        best = int(np.argmin(gain))
        first, second = divmod(best, num_experts)
        # 4. stop when the best swap does not lower the objective by a meaningful amount.
        if not gain[first, second] < -1e-9 * max(1.0, float(pair_counts.max())):
            break
        rank_first, rank_second = mapping[first], mapping[second]
        load_per_rank[rank_first] += expert_load[second] - expert_load[first]
        load_per_rank[rank_second] += expert_load[first] - expert_load[second]
        mapping[first], mapping[second] = rank_second, rank_first
    return mapping


def replicate(loads: np.ndarray, num_ranks: int, num_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_replicas`` extra physical slots to the experts with the highest load per replica.

    loads [E] -> ``(phy2log, logical_replica_count)``: phy2log int64 [P], P = E + num_replicas,
    names the logical expert physical expert p serves (the first E are the experts in order, the
    rest the extra replicas in the order they were granted); logical_replica_count int64 [E]
    (each >= 1, summing to P). One slot at a time goes to the expert with the largest
    ``load / replicas`` (ties: lower id), never taking an expert past ``num_ranks`` replicas
    (more could not sit on distinct ranks). Place them with :func:`place_physical_experts`.

    Raises ValueError unless num_ranks >= 1, 0 <= num_replicas <= E * (num_ranks - 1) and
    P >= num_ranks.
    """
    expert_load = _check_loads(loads, "loads")  # [E]
    num_experts = len(expert_load)
    num_ranks = _check_int("num_ranks", num_ranks, minimum=1)
    num_replicas = _check_int("num_replicas", num_replicas, minimum=0)
    if num_replicas > num_experts * (num_ranks - 1):
        raise ValueError(
            f"num_replicas is {num_replicas}, but {num_experts} experts on {num_ranks} ranks take at most "
            f"{num_experts * (num_ranks - 1)} extra replicas (one per rank each)"
        )
    if num_experts + num_replicas < num_ranks:
        raise ValueError(
            f"num_ranks is {num_ranks}, more than the {num_experts + num_replicas} physical experts "
            f"({num_experts} experts + {num_replicas} replicas)"
        )
    replica_count = np.ones(num_experts, dtype=np.int64)  # [E]
    extra = np.empty(num_replicas, dtype=np.int64)
    for slot in range(num_replicas):
        load_per_replica = np.where(replica_count < num_ranks, expert_load / replica_count, -np.inf)  # [E]
        chosen = int(np.argmax(load_per_replica))
        replica_count[chosen] += 1
        extra[slot] = chosen
    phy2log = np.concatenate([np.arange(num_experts, dtype=np.int64), extra])  # [P]
    return phy2log, replica_count


def place_physical_experts(phy2log: np.ndarray, loads: np.ndarray, num_ranks: int) -> np.ndarray:
    """physical2rank int64 [P]: physical experts on ranks, balancing the load per replica.

    A physical expert of logical expert e is predicted to carry ``loads[e] / replicas(e)``
    (tokens spread evenly over replicas). Packed like :func:`greedy_placement`, with ceil(P / R)
    slots per rank, and replicas of one expert kept on distinct ranks.

    Raises ValueError when phy2log [P] names an expert outside loads [E], leaves one without a
    physical slot, or num_ranks is not in [1, P].
    """
    expert_load = _check_loads(loads, "loads")  # [E]
    replica_count = _check_phy2log(phy2log, len(expert_load))  # [E]
    mapping = np.asarray(phy2log, dtype=np.int64)  # [P]
    num_physical = len(mapping)
    num_ranks = _check_int("num_ranks", num_ranks, minimum=1)
    if num_ranks > num_physical:
        raise ValueError(f"num_ranks is {num_ranks}, more than the {num_physical} physical experts to place")
    load_per_replica = expert_load[mapping] / replica_count[mapping]  # [P]
    return _pack(load_per_replica, num_ranks, -(-num_physical // num_ranks), groups=mapping)


def logical_to_physical(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """log2phy int64 [E, M]: row e lists expert e's physical ids in increasing order, -1 padded.

    M is the most replicas any expert has. Raises ValueError as :func:`place_physical_experts`.
    """
    replica_count = _check_phy2log(phy2log, _check_int("num_experts", num_experts, minimum=1))  # [E]
    mapping = np.asarray(phy2log, dtype=np.int64)  # [P]
    physical_by_expert = np.argsort(mapping, kind="stable")  # [P], grouped by logical expert
    first_of_expert = np.concatenate([[0], np.cumsum(replica_count)[:-1]])  # [E]
    position = np.arange(len(mapping)) - first_of_expert[mapping[physical_by_expert]]  # [P]
    log2phy = np.full((num_experts, int(replica_count.max())), -1, dtype=np.int64)  # [E, M]
    log2phy[mapping[physical_by_expert], position] = physical_by_expert
    return log2phy


def choose_replica_shortest_queue(
    token_expert_ids: np.ndarray,
    log2phy: np.ndarray,
    physical2rank: np.ndarray,
    step_tokens: int | None = None,
) -> np.ndarray:
    """int64 [T, k]: the physical expert serving each of token_expert_ids [T, k]; -1 stays -1.

    Tokens are assigned in order (row by row, slot by slot). Each assignment of logical expert e
    goes to the replica in log2phy[e] (log2phy [E, M], replicas first, -1 padding after) whose
    rank has the shortest queue, a queue being the running count of assignments its rank has
    received; ties go to the replica listed first. physical2rank [P] gives the ranks. Queues
    start empty, and again every ``step_tokens`` tokens when given (a rank's queue drains
    between steps); with None they run over all T tokens.

    Raises ValueError for an id outside [0, E) other than -1 (naming the token and slot), a
    malformed log2phy or physical2rank, or step_tokens < 1.
    """
    ids = np.asarray(token_expert_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"token_expert_ids must be an integer array [T, k], got {ids.dtype} {ids.shape}")
    replicas = np.asarray(log2phy)
    ranks = np.asarray(physical2rank)
    if replicas.ndim != 2 or 0 in replicas.shape or replicas.dtype.kind not in "iu":
        raise ValueError(
            f"log2phy must be a non-empty integer array [E, M], got {replicas.dtype} {replicas.shape}"
        )
    if ranks.ndim != 1 or ranks.size == 0 or ranks.dtype.kind not in "iu" or (ranks < 0).any():
        raise ValueError("physical2rank must be a non-empty 1-D array of integer ranks >= 0")
    num_experts, top_k = replicas.shape[0], ids.shape[1]
    bad = (ids < UNKNOWN_EXPERT) | (ids >= num_experts)  # [T, k]
    if bad.any():
        token, slot = (int(index) for index in np.argwhere(bad)[0])
        raise ValueError(
            f"token {token} slot {slot} names expert {int(ids[token, slot])}; ids must be in "
            f"[0, {num_experts}) or {UNKNOWN_EXPERT} for unknown"
        )
    if ((replicas < UNKNOWN_EXPERT) | (replicas >= len(ranks))).any():
        raise ValueError(f"log2phy holds ids outside [0, {len(ranks)}) other than -1 padding")
    padding_first = (replicas[:, 0] == UNKNOWN_EXPERT) | (
        (replicas[:, 1:] != UNKNOWN_EXPERT) & (replicas[:, :-1] == UNKNOWN_EXPERT)
    ).any(axis=1)  # [E]
    if padding_first.any():
        expert = int(np.argmax(padding_first))
        raise ValueError(f"log2phy row {expert} must list its replicas first and -1 padding after")
    step_tokens = ids.shape[0] if step_tokens is None else _check_int("step_tokens", step_tokens, minimum=1)
    step_assignments = max(step_tokens * top_k, 1)
    num_ranks = int(ranks.max()) + 1
    flat = ids.reshape(-1).astype(np.int64)  # [N], N = T*k
    known = flat != UNKNOWN_EXPERT  # [N]
    replica_count = (replicas != UNKNOWN_EXPERT).sum(axis=1)  # [E]
    chosen = np.full(flat.shape, UNKNOWN_EXPERT, dtype=np.int64)  # [N]
    # 1. experts with one replica need no choice.
    single = known & (replica_count[np.where(known, flat, 0)] == 1)  # [N]
    chosen[single] = replicas[flat[single], 0]
    choice_positions = np.flatnonzero(known & ~single)  # [C]
    if choice_positions.size == 0:
        return chosen.reshape(ids.shape)
    # 2. queue[r] before each choice = single-replica assignments to r since the step began
    #    (vectorised running count) + the choices made so far in the step.
    single_rank = np.full(flat.shape, -1, dtype=np.int64)  # [N]
    single_rank[single] = ranks[chosen[single]]
    step_of_choice = choice_positions // step_assignments  # [C]
    step_start = step_of_choice * step_assignments  # [C]
    fixed_in_step = np.empty((choice_positions.size, num_ranks), dtype=np.int64)  # [C, R]
    for rank in range(num_ranks):  # one rank at a time keeps memory at [N], not [N, R]
        before = np.concatenate([[0], np.cumsum(single_rank == rank)])  # [N+1]: before position n
        fixed_in_step[:, rank] = before[choice_positions] - before[step_start]
    # 3. the choices, in order. A Python loop because each depends on the earlier ones; lists
    #    because indexing them is much faster than indexing numpy scalars.
    options = [
        [(physical, int(ranks[physical])) for physical in row if physical != UNKNOWN_EXPERT]
        for row in replicas.tolist()
    ]  # [E][replicas]: (physical id, rank) in log2phy order
    choice_counts = [0] * num_ranks  # [R]
    current_step = -1
    picked = []
    for expert, step, queue_fixed in zip(
        flat[choice_positions].tolist(), step_of_choice.tolist(), fixed_in_step.tolist(), strict=True
    ):
        if step != current_step:
            choice_counts = [0] * num_ranks
            current_step = step
        candidates = options[expert]
        physical, rank = candidates[0]
        shortest = queue_fixed[rank] + choice_counts[rank]
        for other_physical, other_rank in candidates[1:]:
            length = queue_fixed[other_rank] + choice_counts[other_rank]
            if length < shortest:
                physical, rank, shortest = other_physical, other_rank, length
        choice_counts[rank] += 1
        picked.append(physical)
    chosen[choice_positions] = picked
    return chosen.reshape(ids.shape)


def step_balancedness(token_ranks: np.ndarray, num_ranks: int, step_tokens: int) -> float:
    """Balancedness of steps: sum over steps of the mean rank load / sum over steps of the max.

    token_ranks [T, k]: the rank serving each assignment (-1: none), in token order; a step is
    ``step_tokens`` consecutive tokens (the last may be shorter). If every step lasts as long as
    its busiest rank, this is the share of rank time spent working: 1.0 only when every step is
    perfectly even, and never above ``balancedness`` of the summed loads. NaN without assignments.
    """
    ranks = np.asarray(token_ranks)
    if ranks.ndim != 2 or ranks.dtype.kind not in "iu":
        raise ValueError(f"token_ranks must be an integer array [T, k], got {ranks.dtype} {ranks.shape}")
    num_ranks = _check_int("num_ranks", num_ranks, minimum=1)
    step_tokens = _check_int("step_tokens", step_tokens, minimum=1)
    if ((ranks < -1) | (ranks >= num_ranks)).any():
        raise ValueError(f"token_ranks must be in [0, {num_ranks}) or -1")
    known = ranks != -1  # [T, k]
    step_of_token = np.arange(ranks.shape[0]) // step_tokens  # [T]
    num_steps = int(step_of_token[-1]) + 1 if ranks.shape[0] else 0
    codes = (step_of_token[:, None] * num_ranks + ranks)[known]  # [N]
    per_step = np.bincount(codes, minlength=num_steps * num_ranks).reshape(num_steps, num_ranks)  # [S, R]
    busiest = float(per_step.max(axis=1).sum()) if num_steps else 0.0
    return float(per_step.sum()) / num_ranks / busiest if busiest > 0 else math.nan


# --------------------------------------------------------------------------------------------
# The entry point


@dataclass(frozen=True, eq=False)
class LayerPlacement:
    """The placement of one MoE layer (index ``layer`` on the trace's L axis) and how it balances.

    Rank loads count token assignments. ``fitted_*``: the training part's loads (with
    replication, predicted: each replica carries an equal share of its expert's load).
    ``held_out_*``: the held-out part's routing replayed in steps of the plan's ``step_tokens``
    tokens (with replication, each assignment goes to the replica whose rank has the shortest
    queue in the step). Held-out loads are all zero, and their figures NaN, without a held-out part.
    """

    layer: int
    expert2rank: np.ndarray
    """int64 [E]: the placement without replication."""
    phy2log: np.ndarray
    """int64 [P]: logical expert of each physical expert (``arange(E)`` without replicas)."""
    physical2rank: np.ndarray
    """int64 [P]: rank of each physical expert."""
    logical_replica_count: np.ndarray
    """int64 [E]: physical experts per logical expert (>= 1)."""
    fitted_rank_loads: np.ndarray
    """float64 [R]: training load per rank without replication."""
    fitted_rank_loads_replicated: np.ndarray
    """float64 [R]: predicted training load per rank with replication."""
    held_out_rank_loads: np.ndarray
    """float64 [R]: held-out load per rank without replication."""
    held_out_rank_loads_replicated: np.ndarray
    """float64 [R]: held-out load per rank with replication (shortest-queue replica choice)."""
    held_out_step_balancedness: float
    """``step_balancedness`` of the held-out replay without replication."""
    held_out_step_balancedness_replicated: float
    """``step_balancedness`` of the held-out replay with replication."""
    held_out_same_rank_pair_share: float
    """Share of the held-out tokens' expert pairs whose two experts share a rank without
    replication: the anti-correlation objective, normalised (``(E/R - 1) / (E - 1)`` if random)."""

    @property
    def fitted_balancedness(self) -> float:
        return balancedness(self.fitted_rank_loads)

    @property
    def fitted_balancedness_replicated(self) -> float:
        return balancedness(self.fitted_rank_loads_replicated)

    @property
    def held_out_balancedness(self) -> float:
        return balancedness(self.held_out_rank_loads)

    @property
    def held_out_balancedness_replicated(self) -> float:
        return balancedness(self.held_out_rank_loads_replicated)


@dataclass(frozen=True, eq=False)
class PlacementPlan:
    """Per-layer expert placements for one trace, fitted on its first sequences, tested on the rest.

    The ``mean_*`` properties average a per-layer figure over the layers where it is defined
    (NaN when none is).
    """

    model: str
    num_experts: int
    top_k: int
    num_ranks: int
    num_replicas: int
    """Extra physical experts per layer (P = E + num_replicas)."""
    anticorrelation: bool
    """Whether :func:`refine_anticorrelated` ran after the greedy placements."""
    train_fraction: float
    step_tokens: int | None
    """Tokens per step in the held-out replay; None: the whole held-out part is one step."""
    train_sequences: int
    train_tokens: int
    held_out_sequences: int
    held_out_tokens: int
    layers: tuple[LayerPlacement, ...]

    @property
    def mean_fitted_balancedness(self) -> float:
        return _mean([layer.fitted_balancedness for layer in self.layers])

    @property
    def mean_fitted_balancedness_replicated(self) -> float:
        return _mean([layer.fitted_balancedness_replicated for layer in self.layers])

    @property
    def mean_held_out_balancedness(self) -> float:
        return _mean([layer.held_out_balancedness for layer in self.layers])

    @property
    def mean_held_out_balancedness_replicated(self) -> float:
        return _mean([layer.held_out_balancedness_replicated for layer in self.layers])

    @property
    def mean_held_out_step_balancedness(self) -> float:
        return _mean([layer.held_out_step_balancedness for layer in self.layers])

    @property
    def mean_held_out_step_balancedness_replicated(self) -> float:
        return _mean([layer.held_out_step_balancedness_replicated for layer in self.layers])

    @property
    def mean_held_out_same_rank_pair_share(self) -> float:
        return _mean([layer.held_out_same_rank_pair_share for layer in self.layers])


def plan_placement(
    trace: Trace,
    num_ranks: int,
    num_replicas: int = 0,
    anticorrelation: bool = True,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    step_tokens: int | None = DEFAULT_STEP_TOKENS,
    refine_iterations: int = DEFAULT_REFINE_ITERATIONS,
    load_tolerance: float = DEFAULT_LOAD_TOLERANCE,
) -> PlacementPlan:
    """Place every MoE layer's experts on ``num_ranks`` ranks, with ``num_replicas`` extra replicas.

    Steps:
      1. split the trace by sequence: the first ``floor(train_fraction * S)`` sequences (at least
         one) fit the plan, the rest are held out to evaluate it;
      2. fit, per layer: expert loads [E] and co-activation [E, E] of the training part;
      3. without replication: ``greedy_placement``, then (``anticorrelation``)
         ``refine_anticorrelated`` within ``load_tolerance``;
      4. with replication: ``replicate`` the experts with the highest load per replica,
         ``place_physical_experts``, then (``anticorrelation``) refine the physical placement,
         co-activation split evenly over replicas and replicas kept on distinct ranks;
      5. fitted rank loads: the training loads through both placements (replicas share evenly);
      6. held-out figures: the held-out tokens' routing replayed through both placements in
         steps of ``step_tokens`` tokens (None: one step), replicas chosen by
         ``choose_replica_shortest_queue`` with queues that start empty every step; the summed
         rank loads and ``step_balancedness``.
    With ``num_replicas == 0`` both placements are the same.

    Raises ValueError naming the bad value unless 1 <= num_ranks <= E (the placement without
    replication needs an expert per rank), 0 <= num_replicas <= E * (num_ranks - 1),
    0 < train_fraction <= 1, step_tokens is None or >= 1, and the training part has routed tokens.
    """
    num_experts = trace.meta.num_experts
    num_ranks = _check_int("num_ranks", num_ranks, minimum=1)
    if num_ranks > num_experts:
        raise ValueError(
            f"num_ranks is {num_ranks}, more than the {num_experts} experts per layer: the placement "
            "without replication would leave ranks empty"
        )
    num_replicas = _check_int("num_replicas", num_replicas, minimum=0)
    if num_replicas > num_experts * (num_ranks - 1):
        raise ValueError(
            f"num_replicas is {num_replicas}, but {num_experts} experts on {num_ranks} ranks take at most "
            f"{num_experts * (num_ranks - 1)} extra replicas (one per rank each)"
        )
    if isinstance(train_fraction, bool) or not (
        isinstance(train_fraction, int | float) and 0.0 < train_fraction <= 1.0
    ):
        raise ValueError(f"train_fraction must be a number in (0, 1], got {train_fraction!r}")
    if step_tokens is not None:
        step_tokens = _check_int("step_tokens", step_tokens, minimum=1)
    # 1. split by sequence
    train, held_out = _split_by_sequence(trace, train_fraction)
    replay_step = max(held_out.num_tokens, 1) if step_tokens is None else step_tokens
    # 2. fit
    train_loads = expert_loads(train).astype(np.float64)  # [L, E]
    if train_loads.sum() == 0:
        raise ValueError(
            f"the training part (the first {train.num_sequences} sequences, train_fraction "
            f"{train_fraction}) has no routed tokens to fit a placement on"
        )
    train_pairs = coactivation(train).astype(np.float64) if anticorrelation else None  # [L, E, E]
    held_out_pairs = coactivation(held_out).astype(np.float64)  # [L, E, E]
    layers = []
    for layer in range(trace.num_layers):
        loads = train_loads[layer]  # [E]
        # 3. without replication
        expert2rank = greedy_placement(loads, num_ranks)  # [E]
        if train_pairs is not None:
            expert2rank = refine_anticorrelated(
                expert2rank, loads, train_pairs[layer], refine_iterations, load_tolerance
            )
        # 4. with replication
        phy2log, replica_count = replicate(loads, num_ranks, num_replicas)  # [P], [E]
        physical2rank = place_physical_experts(phy2log, loads, num_ranks)  # [P]
        load_per_replica = loads[phy2log] / replica_count[phy2log]  # [P]
        if train_pairs is not None:
            share = 1.0 / replica_count[phy2log]  # [P]
            physical_pairs = train_pairs[layer][np.ix_(phy2log, phy2log)] * share[:, None] * share[None, :]
            physical2rank = refine_anticorrelated(
                physical2rank, load_per_replica, physical_pairs, refine_iterations, load_tolerance, phy2log
            )
        # 5. fitted
        fitted = rank_loads(loads, expert2rank, num_ranks)  # [R]
        fitted_replicated = rank_loads(load_per_replica, physical2rank, num_ranks)  # [R]
        # 6. held out
        token_experts = held_out.experts[:, layer, :].astype(np.int64)  # [T, k]
        known = token_experts != UNKNOWN_EXPERT  # [T, k]
        token_ranks = np.where(known, expert2rank[np.where(known, token_experts, 0)], -1)  # [T, k]
        log2phy = logical_to_physical(phy2log, num_experts)  # [E, M]
        physical = choose_replica_shortest_queue(token_experts, log2phy, physical2rank, replay_step)  # [T, k]
        token_ranks_replicated = np.where(known, physical2rank[np.where(known, physical, 0)], -1)  # [T, k]
        total_pairs = float(held_out_pairs[layer].sum()) / 2.0
        layers.append(
            LayerPlacement(
                layer=layer,
                expert2rank=expert2rank,
                phy2log=phy2log,
                physical2rank=physical2rank,
                logical_replica_count=replica_count,
                fitted_rank_loads=fitted,
                fitted_rank_loads_replicated=fitted_replicated,
                held_out_rank_loads=_count_ranks(token_ranks, num_ranks),
                held_out_rank_loads_replicated=_count_ranks(token_ranks_replicated, num_ranks),
                held_out_step_balancedness=step_balancedness(token_ranks, num_ranks, replay_step),
                held_out_step_balancedness_replicated=step_balancedness(
                    token_ranks_replicated, num_ranks, replay_step
                ),
                held_out_same_rank_pair_share=(
                    same_rank_coactivation(expert2rank, held_out_pairs[layer]) / total_pairs
                    if total_pairs > 0
                    else math.nan
                ),
            )
        )
    return PlacementPlan(
        model=trace.meta.model,
        num_experts=num_experts,
        top_k=trace.meta.top_k,
        num_ranks=num_ranks,
        num_replicas=num_replicas,
        anticorrelation=anticorrelation,
        train_fraction=float(train_fraction),
        step_tokens=step_tokens,
        train_sequences=train.num_sequences,
        train_tokens=train.num_tokens,
        held_out_sequences=held_out.num_sequences,
        held_out_tokens=held_out.num_tokens,
        layers=tuple(layers),
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _pack(item_loads: np.ndarray, num_ranks: int, capacity: int, groups: np.ndarray | None) -> np.ndarray:
    """item2rank int64 [N]: longest processing time first into ``capacity`` slots per rank.

    With ``groups`` [N], an item avoids ranks that already hold an item of its group while any
    rank with a free slot does not. The caller guarantees ``capacity * num_ranks >= N``.
    """
    assert capacity * num_ranks >= len(item_loads)
    item2rank = np.empty(len(item_loads), dtype=np.int64)  # [N]
    load_per_rank = np.zeros(num_ranks)  # [R]
    items_per_rank = np.zeros(num_ranks, dtype=np.int64)  # [R]
    rank_ids = np.arange(num_ranks)
    group_on_rank = None if groups is None else np.zeros((int(groups.max()) + 1, num_ranks), dtype=bool)
    for item in np.argsort(-item_loads, kind="stable"):
        free = items_per_rank < capacity  # [R]
        if group_on_rank is not None and groups is not None:
            apart = free & ~group_on_rank[groups[item]]
            if apart.any():
                free = apart
        candidates = rank_ids[free]
        # lexsort: the last key is the primary one.
        best = candidates[np.lexsort((candidates, items_per_rank[free], load_per_rank[free]))[0]]
        item2rank[item] = best
        load_per_rank[best] += item_loads[item]
        items_per_rank[best] += 1
        if group_on_rank is not None and groups is not None:
            group_on_rank[groups[item], best] = True
    return item2rank


def _split_by_sequence(trace: Trace, train_fraction: float) -> tuple[Trace, Trace]:
    """(training part, held-out part): the first floor(train_fraction * S) sequences (>= 1), the rest."""
    num_train = min(trace.num_sequences, max(1, math.floor(train_fraction * trace.num_sequences)))
    boundary = int(trace.offsets[num_train])
    train_offsets = trace.offsets[: num_train + 1].astype(OFFSETS_DTYPE)  # [S_train + 1]
    held_out_offsets = (trace.offsets[num_train:] - boundary).astype(OFFSETS_DTYPE)  # [S_held + 1]
    train = Trace(experts=trace.experts[:boundary], offsets=train_offsets, meta=trace.meta)
    held_out = Trace(experts=trace.experts[boundary:], offsets=held_out_offsets, meta=trace.meta)
    return train, held_out


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True ranks is a bug, not a count.
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_loads(loads: object, name: str) -> np.ndarray:
    """float64 [N] copy of ``loads``; ValueError unless a non-empty 1-D array of finite values >= 0."""
    array = np.array(loads, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"{name}[{index}] is {array[index]}; loads must be finite and >= 0")
    return array


def _check_mapping(item2rank: object, name: str, size: int, num_ranks: int | None) -> np.ndarray:
    """int64 [N] copy of a mapping to ranks; ValueError unless [size] with ranks in [0, num_ranks)."""
    array = np.asarray(item2rank)
    if array.shape != (size,) or (size and array.dtype.kind not in "iu"):
        raise ValueError(
            f"{name} must be an integer array of shape ({size},), got {array.dtype} {array.shape}"
        )
    mapping = array.astype(np.int64)
    upper = num_ranks if num_ranks is not None else np.iinfo(np.int64).max
    bad = (mapping < 0) | (mapping >= upper)
    if bad.any():
        index = int(np.argmax(bad))
        allowed = f"[0, {num_ranks})" if num_ranks is not None else ">= 0"
        raise ValueError(f"{name}[{index}] is {mapping[index]}; ranks must be {allowed}")
    return mapping


def _check_coactivation(coactivation: object, num_experts: int) -> np.ndarray:
    array = np.array(coactivation, dtype=np.float64)
    if array.shape != (num_experts, num_experts):
        raise ValueError(f"coactivation must have shape ({num_experts}, {num_experts}), got {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError("coactivation must hold finite counts >= 0")
    if not np.allclose(array, array.T):
        raise ValueError("coactivation must be symmetric")
    return array


def _check_groups(groups: object, size: int) -> np.ndarray | None:
    if groups is None:
        return None
    array = np.asarray(groups)
    if array.shape != (size,) or array.dtype.kind not in "iu" or (array < 0).any():
        raise ValueError(
            f"groups must be non-negative integers of shape ({size},), got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


def _check_phy2log(phy2log: object, num_experts: int) -> np.ndarray:
    """logical_replica_count int64 [E] of phy2log [P]; ValueError unless every expert has a slot."""
    array = np.asarray(phy2log)
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
        raise ValueError(f"phy2log must be a non-empty 1-D integer array, got {array.dtype} {array.shape}")
    bad = (array < 0) | (array >= num_experts)
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"phy2log[{index}] is {array[index]}; logical experts are in [0, {num_experts})")
    replica_count = np.bincount(array.astype(np.int64), minlength=num_experts)  # [E]
    if (replica_count == 0).any():
        missing = int(np.argmin(replica_count))
        raise ValueError(f"phy2log gives expert {missing} no physical slot")
    return replica_count.astype(np.int64)


def _count_ranks(token_ranks: np.ndarray, num_ranks: int) -> np.ndarray:
    """float64 [R]: assignments per rank in token_ranks [T, k] (-1 skipped)."""
    return np.bincount(token_ranks[token_ranks >= 0], minlength=num_ranks).astype(np.float64)


def _mean(values: list[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan
