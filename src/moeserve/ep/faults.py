"""Deliberate failures for tests: a worker that dies mid-run must not hang the others."""

from __future__ import annotations

from moeserve.ep.config import FailureInjection


class InjectedFailure(RuntimeError):
    """Raised by a worker told to fail (``EPConfig.inject_failure``)."""


class FailurePoint:
    """Counts a worker's layer calls and raises :class:`InjectedFailure` when told to."""

    def __init__(self, injection: FailureInjection | None, rank: int) -> None:
        self.limit = injection.after_layer_calls if injection is not None and injection.rank == rank else None
        self.calls = 0

    def tick(self) -> None:
        if self.limit is not None and self.calls >= self.limit:
            raise InjectedFailure(f"injected failure after {self.calls} layer calls")
        self.calls += 1
