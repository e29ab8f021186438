"""What an expert-parallel run does: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.sim.schedulers import LAYER_SCHEDULERS

MODES = ("sync", "async")
"""Exchange modes, in the order a run with several of them executes them."""


@dataclass(frozen=True)
class FailureInjection:
    """Test hook: make worker ``rank`` raise after it has served ``after_layer_calls`` layer calls."""

    rank: int
    after_layer_calls: int = 0

    def __post_init__(self) -> None:
        if self.rank < 0 or self.after_layer_calls < 0:
            raise ValueError(f"failure injection needs rank >= 0 and after_layer_calls >= 0, got {self}")


@dataclass(frozen=True)
class EPConfig:
    """One expert-parallel run: the workload, the processes, the modes and their knobs.

    ``processes`` counts every rank: rank 0 is the attention worker, ranks 1..processes-1 are
    expert workers. Exactly one of ``model`` (a checkpoint folder, or None with ``trace`` None:
    the reference model) and ``trace`` (routing replayed through synthetic experts) is used.
    Invalid values raise ``ValueError`` naming them.
    """

    processes: int = 2
    """Ranks in all (>= 2): one attention worker and processes - 1 expert workers."""
    modes: tuple[str, ...] = ("sync", "async")
    """Modes to run, each over the same requests, in the same processes, one after another."""
    model: str | None = None
    """Checkpoint folder (None: the embedded reference model) when ``trace`` is None."""
    trace: str | None = None
    """A moeserve-trace/1 file: replay its routing through random-weight experts instead of a model."""
    requests: int = 32
    """Sequences decoded together (the in-flight requests)."""
    prompt_tokens: int = 16
    """Prompt length of every request (all equal, so batches need no padding)."""
    new_tokens: int = 16
    """Greedy tokens generated per request (the first comes from the prefill)."""
    rounds: int = 1
    """Times every mode runs, alternating (sync, async, sync, async, ...), in the same processes:
    on a shared machine, ratios of adjacent runs are steadier than of separate launches."""
    micro_batches: int = 2
    """async: the requests are split into this many micro-batches that move through the layers
    independently (sync runs all requests as one batch)."""
    scheduler: str = "defrag"
    """async: layer scheduler name in ``moeserve.sim.schedulers.LAYER_SCHEDULERS``."""
    hold_tokens_per_expert: float = 0.0
    """async: a layer's mu-queue is held until it has this many rows per expert the worker holds
    at that layer (0: run as soon as anything is queued) ..."""
    flush_after_s: float = 0.002
    """async: ... or until its oldest entry has waited this long."""
    threads: int = 1
    """torch intra-op threads per process."""
    warmup: bool = True
    """Run a short untimed pass in each mode first (connections, allocator, kernels)."""
    collective_timeout_s: float = 60.0
    """gloo timeout of one blocking operation; a peer that died fails its partners sooner."""
    run_timeout_s: float = 600.0
    """The launcher stops every worker and raises when the whole run takes longer."""
    hidden_size: int = 128
    """trace workload only: hidden size D of the synthetic model."""
    intermediate_size: int = 160
    """trace workload only: expert intermediate size I of the synthetic experts."""
    seed: int = 0
    """trace workload only: seed of the synthetic weights."""
    inject_failure: FailureInjection | None = None
    """Test hook (see :class:`FailureInjection`)."""

    def __post_init__(self) -> None:
        for name in (
            "processes",
            "requests",
            "prompt_tokens",
            "new_tokens",
            "micro_batches",
            "rounds",
            "threads",
            "hidden_size",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.processes < 2:
            raise ValueError(
                f"processes must be >= 2 (one attention and at least one expert worker), got {self.processes}"
            )
        if not self.modes or any(mode not in MODES for mode in self.modes):
            raise ValueError(f"modes must be a non-empty selection of {', '.join(MODES)}, got {self.modes!r}")
        if self.micro_batches > self.requests:
            raise ValueError(f"micro_batches {self.micro_batches} exceeds requests {self.requests}")
        LAYER_SCHEDULERS.get(self.scheduler)  # raises KeyError with the known names
        for name in ("hold_tokens_per_expert", "flush_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("collective_timeout_s", "run_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.model is not None and self.trace is not None:
            raise ValueError("give a model or a trace, not both")
        if self.inject_failure is not None and self.inject_failure.rank >= self.processes:
            raise ValueError(
                f"inject_failure.rank {self.inject_failure.rank} is not a rank of {self.processes}"
            )

    @property
    def expert_workers(self) -> int:
        return self.processes - 1
