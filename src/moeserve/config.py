"""Frozen configuration dataclasses, one per concern. The CLI only builds these.

Each is validated in ``__post_init__`` and raises ``ValueError`` naming the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEConfig:
    """How the MoE layer gates and computes experts."""

    gating: str = "dropless"
    """``dropless`` (every expert gets exactly its tokens) or ``capacity`` (fixed slots per expert)."""
    capacity_factor: float = 1.25
    """Capacity gating only: slots per expert are ``ceil(capacity_factor * T * k / E)``."""
    backend: str = "auto"
    """Experts backend name from ``moeserve.moe.backends.BACKENDS``; ``auto`` picks the fastest available."""

    def __post_init__(self) -> None:
        if self.gating not in ("dropless", "capacity"):
            raise ValueError(f"gating must be 'dropless' or 'capacity', got {self.gating!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 64
    """Tokens to generate after the prompt."""
    temperature: float = 0.0
    """0 means greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    seed: int | None = None
    """Seed for sampling; None draws one."""
    stop_at_eos: bool = True
    """Stop when the model emits its end-of-sequence token."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class ExpertCacheConfig:
    """Serve routed experts from a cache under a memory budget (None memory: all resident)."""

    memory: str | None = None
    """Budget: a fraction of all expert bytes ("25%", "0.5") or a size ("2GiB", "512MB")."""
    policy: str = "lru"
    """Eviction policy from ``moeserve.memory.policies.EVICTION_POLICIES`` (an online one)."""
    per_layer: bool = False
    """Give every MoE layer its own equal share instead of one pool for all layers."""
    host_memory: str | None = None
    """Host tier between the checkpoint and the resident experts: a fraction of all expert bytes as
    stored ("100%") or a size ("4GiB"); None: no host tier. Needs ``memory``."""

    def __post_init__(self) -> None:
        if self.memory is not None and not self.memory.strip():
            raise ValueError("expert memory budget is empty; give a fraction like 25% or a size like 2GiB")
        if self.host_memory is not None and (self.memory is None or not self.host_memory.strip()):
            raise ValueError(
                f"host memory {self.host_memory!r} needs an expert memory budget and a fraction like 50% or a size like 4GiB"
            )
