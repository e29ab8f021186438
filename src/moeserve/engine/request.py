"""A request's life in the continuous-batching engine: what it asks for and what it has so far.

Torch-free: the scheduler and the server read these; only the model runner touches tensors.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "abort", "error")
"""``stop``: end-of-sequence token or a stop string; ``length``: max_tokens reached;
``abort``: cancelled (client gone, server shutting down); ``error``: the model step failed."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it ends."""

    max_tokens: int = 16
    """Tokens to generate after the prompt (>= 1)."""
    temperature: float = 0.0
    """0 means greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Seed of this request's own generator (sampled requests are reproducible with one)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the text returned stops before the first one."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks use this for fixed lengths)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_ids)}-{time.time_ns() % 10**9:09d}"


@dataclass
class Request:
    """One generation request. The engine thread owns every field but ``abort_requested``."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    slot: int | None = None
    """KV-cache slot while running; slots of running requests are always 0..running-1."""
    first_token_time: float | None = None
    last_token_time: float | None = None
    abort_requested: bool = False
    """Set from any thread (client gone); the engine finishes the request at its next step."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the KV positions this request occupies after its next step."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
