"""Layer schedulers for asynchronous expert parallelism: which layer's mu-queue an expert worker runs.

In ``async`` mode (DESIGN 1C, AMoE arXiv 2505.08944) an expert worker keeps one micro-queue
(mu-queue) of waiting tokens per MoE layer. Whenever it is free it asks a layer scheduler which
layer to run next, then re-batches everything queued for that layer into one invocation.

A scheduler is a pure function ``(snapshot) -> layer`` on a :class:`QueueSnapshot`; it imports no
torch and knows nothing of time, costs or placements. Schedulers are registered in
:data:`LAYER_SCHEDULERS`; unknown names raise ``KeyError`` listing the known ones.

Shape legend: L MoE layers, H history snapshots (at most ``DEFRAG_HISTORY``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moeserve.registry import Registry

DEFRAG_LOOKAHEAD = 4
"""Layers the defrag score looks at: the layer itself and the next ``DEFRAG_LOOKAHEAD - 1``."""
DEFRAG_DECAY = 0.8
"""Weight d of the k-th downstream layer is d**k."""
DEFRAG_HISTORY = 4
"""Snapshots averaged into the history term of the defrag score."""


@dataclass(frozen=True)
class QueueSnapshot:
    """One expert worker's mu-queues at a scheduling decision.

    Contract: ``tokens`` is float64 [L], >= 0, the tokens waiting per layer, already divided by
    top-k (a token routed to k of this worker's experts counts k/top_k); ``history`` is float64
    [H, L] with 0 <= H, the ``tokens`` of earlier snapshots, oldest first; ``eligible`` is bool
    [L], the layers the worker may run now (work queued and past its hold threshold), at least
    one True. Invalid values raise ``ValueError``.
    """

    tokens: np.ndarray
    """float64 [L] tokens waiting per layer (assignments / top_k)."""
    history: np.ndarray
    """float64 [H, L] earlier snapshots of ``tokens``, oldest first."""
    eligible: np.ndarray
    """bool [L] layers the scheduler may choose."""

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or tokens.size == 0 or not np.isfinite(tokens).all() or (tokens < 0).any():
            raise ValueError(f"tokens must be a non-empty 1-D array of finite values >= 0, got {tokens!r}")
        history = np.asarray(self.history)
        if history.ndim != 2 or history.shape[1] != tokens.size:
            raise ValueError(f"history must have shape [H, {tokens.size}], got {history.shape}")
        eligible = np.asarray(self.eligible)
        if eligible.shape != tokens.shape or eligible.dtype != bool or not eligible.any():
            raise ValueError(
                f"eligible must be a bool array of shape {tokens.shape} with a True, got {eligible!r}"
            )

    @property
    def num_layers(self) -> int:
        return int(self.tokens.shape[0])


LayerScheduler = Callable[[QueueSnapshot], int]
"""``scheduler(snapshot) -> layer``: an index i with ``snapshot.eligible[i]`` True."""

LAYER_SCHEDULERS: Registry[LayerScheduler] = Registry("layer scheduler")


def defrag_scores(
    snapshot: QueueSnapshot, lookahead: int = DEFRAG_LOOKAHEAD, decay: float = DEFRAG_DECAY
) -> np.ndarray:
    """float64 [L]: ``score_i = tokens_i + sum_{k=1..lookahead-1} decay**k * (tokens_{i+k} + hist_{i+k})``.

    ``hist`` is the mean of ``snapshot.history`` over its rows (zeros when H == 0); terms past the
    last layer are zero (the lookahead does not wrap to the next token's first layer).
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    tokens = np.asarray(snapshot.tokens, dtype=np.float64)  # [L]
    num_layers = tokens.size
    history = np.asarray(snapshot.history, dtype=np.float64)  # [H, L]
    hist = history.mean(axis=0) if history.shape[0] else np.zeros(num_layers)  # [L]
    downstream = tokens + hist  # [L]
    scores = tokens.copy()  # [L]
    for k in range(1, lookahead):
        shifted = np.zeros(num_layers)  # [L], shifted[i] = downstream[i + k]
        shifted[: num_layers - k] = downstream[k:] if k < num_layers else 0.0
        scores += decay**k * shifted
    return scores


def _best_eligible(scores: np.ndarray, eligible: np.ndarray) -> int:
    """Index of the highest score among eligible layers; ties go to the lowest layer."""
    masked = np.where(eligible, scores, -np.inf)  # [L]
    return int(np.argmax(masked))


@LAYER_SCHEDULERS.register("defrag")
def defrag(snapshot: QueueSnapshot) -> int:
    """The eligible layer with the highest :func:`defrag_scores` (AMoE's defragging scheduler)."""
    return _best_eligible(defrag_scores(snapshot), snapshot.eligible)


@LAYER_SCHEDULERS.register("flfs")
def first_layer_first_served(snapshot: QueueSnapshot) -> int:
    """The lowest eligible layer (first layer first served)."""
    return int(np.argmax(snapshot.eligible))


@LAYER_SCHEDULERS.register("max-batch")
def max_batch(snapshot: QueueSnapshot) -> int:
    """The eligible layer with the most waiting tokens."""
    return _best_eligible(np.asarray(snapshot.tokens, dtype=np.float64), snapshot.eligible)
