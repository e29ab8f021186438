"""Routing statistics of a trace: how skewed, how predictable and how correlated expert use is.

These figures tell whether the memory and placement techniques can pay off on a workload:
load skew and entropy bound what caching hot experts and load-aware placement can gain,
temporal locality is what an LRU cache or a committee scheduler feeds on, and co-activated
pairs are what anti-correlated placement keeps apart.

Shape legend: T tokens, L MoE layers, K slots per token (top_k), E experts, P token pairs.
Entries equal to -1 (unknown routing) are left out of every figure. A figure that has no data
(e.g. a layer whose routing is all unknown) is NaN in the dataclasses and None in ``to_dict``.
Imports numpy and rich only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.table import Table

from moeserve.traces.format import UNKNOWN_EXPERT, Trace


@dataclass(frozen=True)
class ExpertPair:
    """Two experts of one layer chosen together by the same token, ``first < second``."""

    first: int
    second: int
    count: int
    """Tokens that chose both."""


@dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one MoE layer (index ``layer`` on the trace's L axis)."""

    layer: int
    routed_tokens: int
    """Tokens with at least one known expert id at this layer."""
    load_skew: float
    """max / mean expert load (1.0 = perfectly even; E / K when every token picks the same K)."""
    entropy_bits: float
    """Shannon entropy of the expert-load distribution, in bits (log2(E) when even)."""
    normalized_entropy: float
    """``entropy_bits / log2(E)``: 1.0 when even, 0.0 when one expert takes everything."""
    temporal_locality: float
    """Share of a token's known experts that the next token of the same sequence also picks."""
    top_pairs: tuple[ExpertPair, ...]
    """Most co-activated pairs, by count descending then ids ascending; zero counts left out."""


@dataclass(frozen=True)
class TraceStats:
    """Statistics of a whole trace: per-layer figures and their means over layers."""

    model: str
    num_experts: int
    top_k: int
    num_tokens: int
    num_layers: int
    num_sequences: int
    unknown_fraction: float
    """Share of (token, layer, slot) entries that are -1."""
    random_temporal_locality: float
    """``top_k / num_experts``: the temporal locality of routing drawn uniformly at random."""
    layers: tuple[LayerStats, ...]
    mean_load_skew: float
    mean_entropy_bits: float
    mean_normalized_entropy: float
    mean_temporal_locality: float
    """Unweighted means over the layers where the figure is defined."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, numbers and strings (``json.dumps``-able); NaN becomes None."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, TraceStats | LayerStats | ExpertPair):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def trace_stats(trace: Trace, top_pairs: int = 5) -> TraceStats:
    """Compute ``TraceStats`` for ``trace``, listing the ``top_pairs`` most co-activated pairs per layer.

    Per layer:
      1. load: how many known entries name each expert; skew = max / mean over all E experts,
         entropy of load / total (bits), normalised by log2(E).
      2. temporal locality: over pairs of consecutive tokens in the same sequence where both
         tokens have a known id at the layer, (ids of the first token that the second also
         picked) / (known ids of the first token), pooled over the pairs.
      3. co-activation: for every two slots of a token, the unordered pair of known, distinct
         ids; counted over tokens.
    Means over layers skip layers where a figure is undefined.
    """
    if top_pairs < 0:
        raise ValueError(f"top_pairs must be >= 0, got {top_pairs}")
    num_experts = trace.meta.num_experts
    experts = trace.experts  # [T, L, K]
    pair_in_sequence = _consecutive_pairs_in_sequence(trace)  # [T-1] bool
    layers = tuple(
        _layer_stats(layer, experts[:, layer, :], pair_in_sequence, num_experts, top_pairs)
        for layer in range(trace.num_layers)
    )
    unknown_fraction = float((experts == UNKNOWN_EXPERT).mean()) if experts.size else math.nan
    return TraceStats(
        model=trace.meta.model,
        num_experts=num_experts,
        top_k=trace.meta.top_k,
        num_tokens=trace.num_tokens,
        num_layers=trace.num_layers,
        num_sequences=trace.num_sequences,
        unknown_fraction=unknown_fraction,
        random_temporal_locality=trace.meta.top_k / num_experts,
        layers=layers,
        mean_load_skew=_mean([layer.load_skew for layer in layers]),
        mean_entropy_bits=_mean([layer.entropy_bits for layer in layers]),
        mean_normalized_entropy=_mean([layer.normalized_entropy for layer in layers]),
        mean_temporal_locality=_mean([layer.temporal_locality for layer in layers]),
    )


def _consecutive_pairs_in_sequence(trace: Trace) -> np.ndarray:
    """bool [T-1]: True where rows t and t+1 belong to the same sequence."""
    num_tokens = trace.num_tokens
    same_sequence = np.ones(max(num_tokens - 1, 0), dtype=bool)
    sequence_starts = trace.offsets[1:-1]
    sequence_starts = sequence_starts[(sequence_starts > 0) & (sequence_starts < num_tokens)]
    same_sequence[sequence_starts - 1] = False
    return same_sequence


def _layer_stats(
    layer: int,
    layer_experts: np.ndarray,
    pair_in_sequence: np.ndarray,
    num_experts: int,
    top_pairs: int,
) -> LayerStats:
    # layer_experts: [T, K] ids at this layer; pair_in_sequence: [T-1]
    known = layer_experts != UNKNOWN_EXPERT  # [T, K]
    load_skew, entropy_bits, normalized_entropy = _load_balance(layer_experts[known], num_experts)
    return LayerStats(
        layer=layer,
        routed_tokens=int(known.any(axis=1).sum()),
        load_skew=load_skew,
        entropy_bits=entropy_bits,
        normalized_entropy=normalized_entropy,
        temporal_locality=_temporal_locality(layer_experts, known, pair_in_sequence),
        top_pairs=_top_pairs(layer_experts, known, num_experts, top_pairs),
    )


def _load_balance(known_ids: np.ndarray, num_experts: int) -> tuple[float, float, float]:
    """(max/mean load, entropy in bits, normalised entropy) of the known ids [N] of one layer."""
    load = np.bincount(known_ids.astype(np.int64), minlength=num_experts)  # [E]
    total = int(load.sum())
    if total == 0:
        return math.nan, math.nan, math.nan
    load_skew = float(load.max() / (total / num_experts))
    share = load[load > 0] / total
    entropy_bits = float(-(share * np.log2(share)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    # With one expert there is nothing to balance: call it perfectly even.
    normalized_entropy = entropy_bits / math.log2(num_experts) if num_experts > 1 else 1.0
    return load_skew, entropy_bits, normalized_entropy


def _temporal_locality(layer_experts: np.ndarray, known: np.ndarray, pair_in_sequence: np.ndarray) -> float:
    # A pair where either token's routing is wholly unknown says nothing about reuse, so it is
    # left out rather than counted as a miss.
    routed = np.any(known, axis=1)  # [T]
    usable = pair_in_sequence & routed[:-1] & routed[1:]  # [T-1]
    current = layer_experts[:-1][usable]  # [P, K]
    following = layer_experts[1:][usable]  # [P, K]
    current_known = known[:-1][usable]  # [P, K]
    # An unknown id of `current` never counts as reused, even if `following` has -1 too.
    reused = (current[:, :, None] == following[:, None, :]).any(axis=2) & current_known  # [P, K]
    known_count = int(current_known.sum())
    return int(reused.sum()) / known_count if known_count else math.nan


def _top_pairs(
    layer_experts: np.ndarray, known: np.ndarray, num_experts: int, top_pairs: int
) -> tuple[ExpertPair, ...]:
    if top_pairs == 0:
        return ()
    slots = layer_experts.shape[1]
    ids = layer_experts.astype(np.int64)  # [T, K]
    pair_codes = []
    for slot_a in range(slots):
        for slot_b in range(slot_a + 1, slots):
            a, b = ids[:, slot_a], ids[:, slot_b]  # [T] each
            valid = known[:, slot_a] & known[:, slot_b] & (a != b)
            low, high = np.minimum(a, b)[valid], np.maximum(a, b)[valid]
            pair_codes.append(low * num_experts + high)
    if not pair_codes:
        return ()
    counts = np.bincount(np.concatenate(pair_codes), minlength=num_experts * num_experts)  # [E*E]
    # Stable sort on -count keeps equal counts in ascending code order, i.e. ascending ids.
    order = np.argsort(-counts, kind="stable")[:top_pairs]
    return tuple(
        ExpertPair(first=int(code) // num_experts, second=int(code) % num_experts, count=int(counts[code]))
        for code in order
        if counts[code] > 0
    )


def _mean(values: list[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def render_stats_table(stats: TraceStats, pairs_shown: int = 3) -> Table:
    """A rich table: one row per layer, then the mean row; the random baseline in the caption."""
    table = Table(
        title=(
            f"{stats.model}: {stats.num_tokens:,} tokens, {stats.num_sequences:,} sequences, "
            f"{stats.num_layers} MoE layers, {stats.num_experts} experts, top-{stats.top_k}"
        ),
        caption=(
            f"temporal locality if routing were random: {_format(stats.random_temporal_locality)} "
            f"(top_k / num_experts); unknown entries: {_format(stats.unknown_fraction)}"
        ),
    )
    table.add_column("layer", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("load skew\n(max/mean)", justify="right")
    table.add_column("entropy\n(bits)", justify="right")
    table.add_column("entropy\n(normalised)", justify="right")
    table.add_column("temporal\nlocality", justify="right")
    table.add_column("top co-activated pairs (tokens)")
    for layer in stats.layers:
        pairs = ", ".join(
            f"{pair.first}+{pair.second} ({pair.count})" for pair in layer.top_pairs[:pairs_shown]
        )
        table.add_row(
            str(layer.layer),
            f"{layer.routed_tokens:,}",
            _format(layer.load_skew, digits=2),
            _format(layer.entropy_bits, digits=2),
            _format(layer.normalized_entropy),
            _format(layer.temporal_locality),
            pairs,
            end_section=layer is stats.layers[-1],
        )
    table.add_row(
        "mean",
        "",
        _format(stats.mean_load_skew, digits=2),
        _format(stats.mean_entropy_bits, digits=2),
        _format(stats.mean_normalized_entropy),
        _format(stats.mean_temporal_locality),
        "",
        style="bold",
    )
    return table


def _format(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
