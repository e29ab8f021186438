"""The emulator's billing ledger: one line per invocation or cold start, billed at Lambda prices.

A line is billed as Lambda bills (``prices.LambdaPrices``): its duration rounded up to the
billing increment (1 ms), times memory in GB (1 GB = 1024 MB), at the GB-second price of the
architecture; an invocation also pays the per-request price. A cold start (INIT phase) is billed
as duration without a request of its own (Lambda has billed on-demand INIT since 2025-08-01;
the request is paid by the invocation it serves). Failed invocations (timeout, out of memory,
handler error) are billed for the time they ran, as Lambda does.

This module knows prices and lines; it does not know processes, plans or how a duration was
measured (the emulator records that in each line).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moeserve.serverless.prices import LambdaPrices

KINDS = ("invoke", "init")
OUTCOMES = ("ok", "timeout", "out_of_memory", "error")


@dataclass(frozen=True)
class LedgerEntry:
    """One billed line: an invocation of a function instance, or that instance's cold start.

    Contract: ``kind`` in :data:`KINDS`, ``outcome`` in :data:`OUTCOMES`, ``billed_ms`` is
    ``duration_ms`` rounded up to the billing increment (at least one), ``cost_usd`` is what
    :func:`line_cost` gives for it.
    """

    kind: str
    layer: int
    function: int
    replica: int
    """Which instance (0..replicas-1) of the function."""
    batch: int
    """Batch index for invocations; -1 for cold starts."""
    micro_batch: int
    """Micro-batch index within the batch for invocations; -1 for cold starts."""
    memory_mb: int
    duration_ms: float
    """Billed duration before rounding: for invocations the handler's CPU time at the function's
    CPU share (``emulator.handler_duration_s``), or the timeout; for cold starts the INIT wall time."""
    billed_ms: int
    cost_usd: float
    outcome: str
    tokens: int = 0
    """Token-assignments in the invocation."""
    experts_touched: int = 0
    """Distinct experts the invocation's tokens went to."""
    single_token_experts: int = 0
    """Of those, the experts given exactly one token (the cost model prices them apart)."""
    rows: int = 0
    """Distinct token rows sent (a row goes once to a function, whatever number of its experts it chose)."""
    request_bytes: int = 0
    response_bytes: int = 0
    json_bytes: int = 0
    """Of the request and response bytes, those the handler parsed or wrote as JSON (the event;
    a raw-bytes response and the object-store channel's raw rows are not JSON)."""
    wall_s: float = 0.0
    """Measured wall seconds of the handler (including the CPU-share duty cycle, modelled I/O sleeps and
    this host's contention)."""
    cpu_s: float = 0.0
    """Measured CPU seconds of the handler's thread."""
    experts_cpu_s: float = 0.0
    """Of ``cpu_s``, the expert matmuls (the rest decodes the event and encodes the response)."""
    io_s: float = 0.0
    """Object-store GET/PUT time inside the handler (modelled, slept by the worker)."""
    scaled: bool = False
    """True when the function has >= 1 vCPU, so ``duration_ms`` used the modelled multi-thread speedup."""
    max_rss_mb: float = 0.0
    """Peak resident memory of the instance's process so far (VmHWM), measured."""
    started_s: float = 0.0
    ended_s: float = 0.0
    """Start and end on the gate's clock, seconds since the run began."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def line_cost(
    limits: LambdaPrices, price_per_gb_second: float, kind: str, memory_mb: int, billed_ms: int
) -> float:
    """USD of one line: GB-seconds of ``billed_ms`` at ``memory_mb``, plus the request price for an invocation."""
    cost = billed_ms / 1000.0 * memory_mb / 1024.0 * price_per_gb_second
    if kind == "invoke":
        cost += limits.price_per_million_requests / 1e6
    return cost


class Ledger:
    """Billed lines of one emulator run, in the order they completed. Thread-safe."""

    def __init__(self, limits: LambdaPrices, architecture: str) -> None:
        if architecture not in limits.price_per_gb_second:
            known = ", ".join(sorted(limits.price_per_gb_second))
            raise ValueError(f"no Lambda price for architecture {architecture!r}; known: {known}")
        self.limits = limits
        self.architecture = architecture
        self._entries: list[LedgerEntry] = []
        self._lock = threading.Lock()

    def bill(
        self, kind: str, memory_mb: int, duration_ms: float, outcome: str = "ok", **details: Any
    ) -> LedgerEntry:
        """Record one line of ``duration_ms`` at ``memory_mb``, rounded and priced here; returns it."""
        self.limits.check_memory(memory_mb)
        billed = self.limits.billed_duration_ms(duration_ms)
        price = self.limits.price_per_gb_second[self.architecture]
        entry = LedgerEntry(
            kind=kind,
            memory_mb=memory_mb,
            duration_ms=duration_ms,
            billed_ms=billed,
            cost_usd=line_cost(self.limits, price, kind, memory_mb, billed),
            outcome=outcome,
            **details,
        )
        with self._lock:
            self._entries.append(entry)
        return entry

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        with self._lock:
            return tuple(self._entries)

    def total(self, kind: str | None = None) -> float:
        """USD of every line (of ``kind`` when given)."""
        return sum(e.cost_usd for e in self.entries if kind is None or e.kind == kind)

    def count(self, kind: str, outcome: str | None = None) -> int:
        return sum(1 for e in self.entries if e.kind == kind and (outcome is None or e.outcome == outcome))

    def max_concurrency(self) -> int:
        """Most invocations in flight at once, from the lines' start and end times (measured)."""
        invokes = [e for e in self.entries if e.kind == "invoke"]
        if not invokes:
            return 0
        # Ends sort before starts at the same instant: back-to-back calls do not overlap.
        events = sorted([(e.started_s, 1) for e in invokes] + [(e.ended_s, -1) for e in invokes])
        return int(np.max(np.cumsum([delta for _, delta in events])))

    def summary(self) -> dict[str, Any]:
        invokes = [e for e in self.entries if e.kind == "invoke"]
        inits = [e for e in self.entries if e.kind == "init"]
        return {
            "architecture": self.architecture,
            "invocations": len(invokes),
            "failed_invocations": sum(1 for e in invokes if e.outcome != "ok"),
            "cold_starts": len(inits),
            "invoke_cost_usd": sum(e.cost_usd for e in invokes),
            "init_cost_usd": sum(e.cost_usd for e in inits),
            "billed_ms": sum(e.billed_ms for e in invokes),
            "duration_ms": sum(e.duration_ms for e in invokes),
            "gb_seconds": sum(e.billed_ms / 1000.0 * e.memory_mb / 1024.0 for e in invokes),
            "max_concurrency": self.max_concurrency(),
        }
