"""Environment variables moeserve reads, declared once, typed, with the MOESERVE_ prefix.

Nothing else in moeserve reads ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Environment:
    num_threads: int | None
    """MOESERVE_NUM_THREADS: torch intra-op threads for generation and benchmarks (unset: torch's default)."""


def _optional_positive_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def read_environment() -> Environment:
    return Environment(num_threads=_optional_positive_int("MOESERVE_NUM_THREADS"))


def apply_thread_count(threads: int | None) -> int:
    """Set torch's intra-op thread count (None: MOESERVE_NUM_THREADS, else leave torch's default).

    Returns the count in force. Small expert matmuls gain little from a second thread, and on a
    busy machine a parallel region waits for a descheduled thread: one thread can be faster.
    """
    import torch

    chosen = threads if threads is not None else read_environment().num_threads
    if chosen is not None:
        if chosen < 1:
            raise ValueError(f"thread count must be >= 1, got {chosen}")
        torch.set_num_threads(chosen)
    return torch.get_num_threads()


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
