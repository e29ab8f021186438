"""Drive sessions of requests step by step and record what they produced and when.

Shared by the one-process reference, the sync mode (one session of every request) and the
async mode (one session per micro-batch, each in its own thread). Knows nothing of processes.

Shape legend: R requests, G steps (new tokens), V outputs per position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from moeserve.ep.workload import Workload


@dataclass
class RequestRecord:
    """Outputs and timings of R requests over G steps, filled by :meth:`body`."""

    requests: int
    steps: int
    token_ids: np.ndarray = field(init=False)
    """int64 [R, G] greedy choice at every step (argmax of the outputs)."""
    first_outputs: np.ndarray | None = None
    """float32 [R, V] outputs of the prefill step."""
    last_outputs: np.ndarray | None = None
    """float32 [R, V] outputs of the last step."""
    token_latencies_s: list[float] = field(default_factory=list)
    """One entry per decode token (steps after the prefill): its step's wall time."""
    first_token_s: list[float] = field(default_factory=list)
    """One entry per request: wall time of its prefill step."""

    def __post_init__(self) -> None:
        self.token_ids = np.zeros((self.requests, self.steps), dtype=np.int64)

    def body(self, workload: Workload, requests: slice, prompt_tokens: int) -> Callable[[], None]:
        """A callable that opens a session for ``requests`` and runs all its steps, recording them."""

        def run() -> None:
            session = workload.session(requests, prompt_tokens)
            for step in range(self.steps):
                start = time.perf_counter()
                outputs = session.step()  # [b, V]
                elapsed = time.perf_counter() - start
                count = outputs.shape[0]
                self.token_ids[requests, step] = torch.argmax(outputs, dim=-1).numpy()
                if step == 0:
                    self._store("first_outputs", requests, outputs)
                    self.first_token_s.extend([elapsed] * count)
                else:
                    self.token_latencies_s.extend([elapsed] * count)
                if step == self.steps - 1:
                    self._store("last_outputs", requests, outputs)

        return run

    def _store(self, name: str, requests: slice, outputs: torch.Tensor) -> None:
        array = getattr(self, name)
        if array is None:
            array = np.zeros((self.requests, outputs.shape[1]), dtype=np.float32)
            setattr(self, name, array)
        array[requests] = outputs.float().numpy()


def micro_batch_slices(requests: int, micro_batches: int) -> list[slice]:
    """``micro_batches`` contiguous, near-equal slices of ``range(requests)``."""
    bounds = np.linspace(0, requests, micro_batches + 1).astype(int)
    return [slice(int(start), int(stop)) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
