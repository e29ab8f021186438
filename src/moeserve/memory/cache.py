"""A live expert cache: the routed experts of every MoE layer, resident within a byte budget.

Shape legend: E experts in a layer, k experts per token (top-k), D hidden size, I expert
intermediate size, S slots (experts the cache can hold at once).

Tiers. Resident slot tensors (on the cache's device) <- the checkpoint's safetensors files, read
one expert at a time through :class:`~moeserve.memory.store.ExpertStore` straight into a slot
(CPU, stored dtype) or through one staging buffer per layer when the resident dtype or device
differs from the stored one. With ``host_budget_bytes`` a host tier
(:class:`~moeserve.memory.host_tier.HostTier`, its own byte budget, LRU) sits in between:
slots <- host buffers <- checkpoint. A slot miss is copied from the host tier when it holds the
expert (a *host hit*: no disk read), else read from disk into a host buffer first; host buffers
replace the staging buffers. On a CUDA device the host buffers are pinned, and every copy into a
slot runs on a side CUDA stream (:class:`~moeserve.memory.transfer.CudaStreamCopier`): the
compute stream waits on the copy's event just before the slot is used, and a copy into an
evicted slot waits for compute enqueued before the eviction; no host synchronisation on the
forward's path. On a CPU device the host tier is plain RAM (a second RAM tier: it saves disk or
page-cache reads, not the copy into the slot) and copies are synchronous
(:class:`~moeserve.memory.transfer.SynchronousCopier`, the reference). Slots are allocated on
first use and reused, never freed while the cache lives, so the memory the cache holds is at
most ``S * expert bytes <= budget``; the host tier's buffers stay within their own budget.

How a step is served (``exact``: outputs are bit-identical to every expert resident):

1. ``observe(layer, routing)`` is the MoE layer's routing observer, called before dispatch. The
   distinct experts routed in that call are the layer's *step*.
2. The step's missing experts are loaded before the experts stage runs. When the cache is
   full, the eviction policy picks victims among the resident experts the step does not need
   (the step's experts are pinned), then learns the step through ``on_step``.
3. The experts stage asks the layer's :class:`CachedLayerExperts` for ``gate_up(e)`` /
   ``down(e)`` and gets the resident slot tensors.

A step needing more distinct experts than the cache holds (a prefill routes many tokens) is
**split**, not refused: its experts are served in ascending groups of at most S, and a group is
loaded when the experts stage first asks for one of its experts. That relies on the contract
of the per-expert backends (``loop``, ``cpu``): experts are requested in ascending order and
each one's output is computed before the next is requested. Tensors returned for an expert
stay valid until its group's step is over: until the next step of a cache sharing its slots,
the next group of a split step, or a request for a missing expert the routing did not announce
(served as a one-expert step of its own; an unannounced resident expert is returned as it is,
unseen by the policy and the counters). The budget must hold at least the top-k experts of
one layer (each token needs them together); a smaller one raises :class:`ExpertBudgetError`
naming the minimum in bytes and in experts.

Scopes: one cache of S slots shared by all layers (default; a busy layer may hold more than
its share), or ``per_layer``: the same number of slots in every layer, each layer with its own
policy. Policies come from :data:`~moeserve.memory.policies.EVICTION_POLICIES` and see keys
``offset(layer) + expert`` (shared) or ``expert`` (per layer), one step per served group, in
the order the model runs. ``belady`` needs the future: give it the ``step_log`` of an identical
earlier run (``record_steps=True``); policies that need the whole stream in advance
(``needs_stream``, e.g. ``predicted-reuse``) cannot run live and are refused.

Prefetch (``prefetch(layer, experts)``, fed by :mod:`moeserve.memory.prefetch`): a layer's
predicted experts are loaded ahead of its step on one background thread (or inline, for a
deterministic reference). A prefetch load takes a free slot or evicts one resident expert the
policy picks, never one pinned by the running step (the experts of the pool's last step), one
still loading, or one of the same prediction; when nothing may be evicted it stops. A slot is
reserved (and counted in ``resident_bytes``) before its read starts, so the budget holds at
every instant. The expert enters the policy when its read completes (as a one-key step at
the pool's current time). A step that needs an expert still loading waits for it: that use
stalls, as does every synchronous load. Predictions are scored against the layer's next step
(precision and recall in :class:`CacheStats`). Online policies only.

This module knows nothing of transformers models or where MoE layers sit in them
(:mod:`moeserve.memory.offload` wires a cache into a model), nor of how experts are predicted;
streams and events are the copier's business (:mod:`moeserve.memory.transfer`), host buffers
the host tier's. One forward at a time; the background loader is the only other thread, and
every change of residency happens under the cache's lock. The forward thread may wait for a host
buffer while holding that lock, so a thread holding a host buffer never takes it (``_read``).
"""

from __future__ import annotations

import re
import threading
import time as clock
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.errors import MoeserveError
from moeserve.memory.cache_sim import PolicyContractError
from moeserve.memory.host_tier import ExpertShape, HostTier
from moeserve.memory.policies import EVICTION_POLICIES, EvictionPolicy
from moeserve.memory.store import ExpertStore
from moeserve.memory.transfer import SlotCopier, slot_copier
from moeserve.moe.types import RouterOutput

StepLog = list[tuple[int, tuple[int, ...]]]
"""Steps a cache served, in order: (MoE-layer index, ascending expert ids of the step)."""

SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
"""Byte units ``parse_expert_memory`` accepts (case-insensitive): decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB."""

_MEMORY_TEXT = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>%|[a-z]*)\s*$", re.IGNORECASE)


class ExpertBudgetError(MoeserveError, ValueError):
    """An expert memory budget too small for the model (the message names the minimum)."""


@dataclass(frozen=True)
class ExpertMemory:
    """A budget for resident experts: ``nbytes`` bytes, or a ``fraction`` of all expert bytes.

    Exactly one of the two is set. ``fraction`` is of the experts' bytes as the model holds them
    (its compute dtype), in (0, 1].
    """

    nbytes: int | None = None
    """Bytes the resident experts may occupy, >= 1."""
    fraction: float | None = None
    """Share of all routed experts' bytes, in (0, 1]."""

    def __post_init__(self) -> None:
        if (self.nbytes is None) == (self.fraction is None):
            raise ValueError(
                f"give exactly one of nbytes and fraction, got nbytes={self.nbytes}, fraction={self.fraction}"
            )
        if self.nbytes is not None and self.nbytes < 1:
            raise ValueError(f"expert memory must be at least 1 byte, got {self.nbytes}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"expert memory fraction must be in (0, 1], got {self.fraction}")

    def resolve(self, total_expert_bytes: int) -> int:
        """The budget in bytes for a model whose routed experts take ``total_expert_bytes``."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.fraction is not None
        return int(self.fraction * total_expert_bytes)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return format_bytes(self.nbytes)
        assert self.fraction is not None
        return f"{self.fraction * 100:g}%"


def parse_expert_memory(text: str) -> ExpertMemory:
    """Parse ``--expert-memory``: ``"25%"`` or ``"0.5"`` (fractions of all expert bytes) or a size.

    Sizes need a unit from :data:`SIZE_UNITS` (``"2GiB"``, ``"512MB"``, ``"1000000B"``); a bare
    number is a fraction and must lie in (0, 1], so ``"2"`` is refused rather than read as two
    bytes. Raises ``ValueError`` naming the text and what is accepted.
    """
    match = _MEMORY_TEXT.match(text)
    accepted = "a percentage (25%), a fraction in (0, 1] (0.5) or a size with a unit (2GiB, 512MB)"
    if match is None:
        raise ValueError(f"expert memory {text!r} is not {accepted}")
    number, unit = float(match["number"]), match["unit"].lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"expert memory {text!r}: a percentage must be in (0, 100]")
        return ExpertMemory(fraction=number / 100)
    if not unit:
        if not 0 < number <= 1:
            raise ValueError(
                f"expert memory {text!r}: a bare number is a fraction of all expert bytes and must be "
                f"in (0, 1]; give sizes with a unit, e.g. {number:g}GiB or {number:g}B"
            )
        return ExpertMemory(fraction=number)
    if unit not in SIZE_UNITS:
        raise ValueError(
            f"expert memory {text!r}: unknown unit {match['unit']!r}; known: {', '.join(SIZE_UNITS)}"
        )
    nbytes = int(number * SIZE_UNITS[unit])
    if nbytes < 1:
        raise ValueError(f"expert memory {text!r} is less than one byte")
    return ExpertMemory(nbytes=nbytes)


def format_bytes(nbytes: int) -> str:
    """``1536 -> '1.5 KiB'``: binary units, for messages and tables."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CacheStats:
    """Counters of an :class:`ExpertCache` since construction or ``reset_stats``.

    A *request* is one expert of one step: an MoE layer call asks for each distinct expert it
    routes to once (a split call asks for each in the group that serves it), so
    ``hits + misses`` is the sum over layer calls of their distinct routed experts. A hit found
    the expert resident (a completed prefetch counts); a miss waited for it: a synchronous load,
    or a prefetch still in flight. So ``stalled_uses == misses``.
    """

    steps: int
    """Steps served: one per MoE layer call, one more per extra group of a split call."""
    hits: int
    misses: int
    loads: int
    """Experts read from the checkpoint into a slot (synchronous and prefetched)."""
    evictions: int
    bytes_read: int
    """Checkpoint bytes read by the loads (stored dtype)."""
    stall_seconds: float
    """Wall time the forward waited on loads."""
    split_steps: int
    """Layer calls that needed more distinct experts than the cache holds (served in groups)."""
    resident_bytes: int
    max_resident_bytes: int
    """High-water mark of ``resident_bytes``."""
    budget_bytes: int
    prefetch_loads: int
    """Experts loaded by prefetch (included in ``loads``)."""
    prefetch_used: int
    """Prefetched experts a step used before they were evicted."""
    prefetch_waits: int
    """Uses that waited for a prefetch still in flight (included in ``misses``)."""
    predicted: int
    """Experts predicted over all scored predictions (each against the layer's next step)."""
    predicted_actual: int
    """Experts routed by the steps that had a prediction."""
    predicted_correct: int
    """Predicted experts the step routed: |predicted & actual| summed."""
    layer_hits: tuple[int, ...] = field(repr=False)
    """Hits per MoE layer."""
    layer_misses: tuple[int, ...] = field(repr=False)
    """Misses per MoE layer."""
    device: str = "cpu"
    """Where the resident slots live (``cpu``, ``cuda:0``)."""
    copier: str = "synchronous"
    """How experts reach the slots: ``synchronous`` (copy_ on the calling thread) or ``cuda-stream``."""
    host_tier: str = "none"
    """``none`` (disk -> slots), ``pinned`` (disk -> pinned host -> GPU slots) or ``ram`` (disk -> plain
    host memory -> slots on the CPU: a second RAM tier, which saves reads, not copies)."""
    host_hits: int = 0
    """Loads served from the host tier without reading the checkpoint (included in ``loads``)."""
    host_evictions: int = 0
    host_resident_bytes: int = 0
    """Bytes of the experts the host tier holds now (checkpoint dtype; pinned, each counts its whole
    block: :meth:`~moeserve.memory.host_tier.HostTier.charged_bytes`)."""
    max_host_resident_bytes: int = 0
    """High-water mark of ``host_resident_bytes``."""
    host_budget_bytes: int = 0
    """The host tier's budget (0 without one)."""

    @property
    def requests(self) -> int:
        """Hits + misses."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Hits / requests (NaN before the first request)."""
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def disk_loads(self) -> int:
        """Loads that read the checkpoint (``loads - host_hits``)."""
        return self.loads - self.host_hits

    @property
    def stalled_uses(self) -> int:
        """Expert uses that waited on a load, synchronous or prefetched (= misses)."""
        return self.misses

    @property
    def prefetch_precision(self) -> float:
        """|predicted & actual| / |predicted| over scored predictions (NaN without one)."""
        return self.predicted_correct / self.predicted if self.predicted else float("nan")

    @property
    def prefetch_recall(self) -> float:
        """|predicted & actual| / |actual| over steps that had a prediction (NaN without one)."""
        return self.predicted_correct / self.predicted_actual if self.predicted_actual else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (NaN becomes None)."""

        def plain(value: float) -> float | None:
            return None if value != value else value

        rate = self.hit_rate
        return {
            "steps": self.steps,
            "requests": self.requests,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": None if rate != rate else rate,
            "loads": self.loads,
            "evictions": self.evictions,
            "bytes_read": self.bytes_read,
            "stall_seconds": self.stall_seconds,
            "split_steps": self.split_steps,
            "resident_bytes": self.resident_bytes,
            "max_resident_bytes": self.max_resident_bytes,
            "budget_bytes": self.budget_bytes,
            "stalled_uses": self.stalled_uses,
            "prefetch_loads": self.prefetch_loads,
            "prefetch_used": self.prefetch_used,
            "prefetch_waits": self.prefetch_waits,
            "prefetch_precision": plain(self.prefetch_precision),
            "prefetch_recall": plain(self.prefetch_recall),
            "layer_hits": list(self.layer_hits),
            "layer_misses": list(self.layer_misses),
            "device": self.device,
            "copier": self.copier,
            "host_tier": self.host_tier,
            "host_hits": self.host_hits,
            "disk_loads": self.disk_loads,
            "host_evictions": self.host_evictions,
            "host_resident_bytes": self.host_resident_bytes,
            "max_host_resident_bytes": self.max_host_resident_bytes,
            "host_budget_bytes": self.host_budget_bytes,
        }


@dataclass
class _Counters:
    num_layers: int
    steps: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_read: int = 0
    stall_seconds: float = 0.0
    split_steps: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0
    prefetch_waits: int = 0
    predicted: int = 0
    predicted_actual: int = 0
    predicted_correct: int = 0
    host_hits: int = 0
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layer_hits = [0] * self.num_layers
        self.layer_misses = [0] * self.num_layers


class _SlotPool:
    """The slots one policy manages: which key each holds, free slots, the policy's step clock.

    Keys are ``key_offset[layer] + expert``; ``key_owner[key]`` maps back. Slot tensors are
    allocated on first use (outside inference mode, so later loads may write them under any
    grad mode) and reused after eviction.
    """

    def __init__(
        self,
        index: int,
        policy: EvictionPolicy,
        capacity: int,
        key_owner: list[tuple[int, int]],
        gate_up_shape: tuple[int, int],
        down_shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.index = index
        self.policy = policy
        self.capacity = capacity
        self.key_owner = key_owner
        self.gate_up_shape, self.down_shape = gate_up_shape, down_shape
        self.dtype, self.device = dtype, device
        self.slot_bytes = (
            gate_up_shape[0] * gate_up_shape[1] + down_shape[0] * down_shape[1]
        ) * dtype.itemsize
        self.gate_up: list[torch.Tensor] = []  # slot -> [2I, D]
        self.down: list[torch.Tensor] = []  # slot -> [D, I]
        self.free: list[int] = []
        self.key2slot: dict[int, int] = {}
        self.loading: set[int] = set()  # keys whose prefetch read is in flight (slot reserved)
        self.prefetched: set[int] = set()  # prefetched keys no step has used yet
        self.pinned: set[int] = set()  # keys of the pool's last step: prefetch never evicts them
        self.time = 0
        self.future: list[tuple[int, ...]] | None = None  # the steps a future-reading policy was given

    def take_slot(self) -> int:
        if self.free:
            return self.free.pop()
        assert len(self.gate_up) < self.capacity, "every slot is taken; evict first"
        with torch.inference_mode(False):
            self.gate_up.append(torch.empty(self.gate_up_shape, dtype=self.dtype, device=self.device))
            self.down.append(torch.empty(self.down_shape, dtype=self.dtype, device=self.device))
        return len(self.gate_up) - 1

    def release(self) -> None:
        self.gate_up.clear()
        self.down.clear()
        self.free.clear()
        self.key2slot.clear()
        self.loading.clear()
        self.prefetched.clear()
        self.pinned = set()


class CachedLayerExperts:
    """The :class:`~moeserve.moe.types.ExpertProvider` of one MoE layer, served by an :class:`ExpertCache`.

    ``gate_up(e)`` [2I, D] and ``down(e)`` [D, I] return the resident slot tensors, loading the
    expert (or the group of a split step it belongs to) on a miss; see the module docstring for
    how long a returned tensor stays valid. ``stacked()`` is None: experts are not in one
    tensor, so only per-expert backends run over it.
    """

    def __init__(self, cache: ExpertCache, layer_index: int, num_experts: int, pool: _SlotPool) -> None:
        self._cache = cache
        self.layer_index = layer_index
        self._num_experts = num_experts
        self._dtype = pool.dtype
        self._device = pool.device
        self._gate_up_slots = pool.gate_up  # shared with the pool (and, when global, other layers)
        self._down_slots = pool.down
        self._pool_index = pool.index
        self._wait_ready = cache.copier.wait_ready
        self.expert2slot: list[int] = [-1] * num_experts
        """Slot of each resident expert, -1 when absent; kept by the cache."""
        self.groups: list[list[int]] = []
        """Groups of the current step not yet served (ascending), when the step was split."""
        self.next_group_first = num_experts
        """First expert of ``groups[0]``; ``num_experts`` when no group is pending."""

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _slot(self, expert: int) -> int:
        # Read the slot once: a background prefetch may evict an unpinned expert between two reads.
        slot = self.expert2slot[expert]
        if expert >= self.next_group_first or slot < 0:
            self._cache.request(self.layer_index, expert)
            slot = self.expert2slot[expert]
        assert slot >= 0, f"expert {expert} of layer {self.layer_index} is not resident after its request"
        # Synchronous copier: nothing to do. CUDA: the compute stream waits for the slot's copy, if pending.
        self._wait_ready(self._pool_index, (slot,))
        return slot

    def gate_up(self, expert: int) -> torch.Tensor:
        return self._gate_up_slots[self._slot(expert)]  # [2I, D]

    def down(self, expert: int) -> torch.Tensor:
        return self._down_slots[self._slot(expert)]  # [D, I]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def resident_experts(self) -> list[int]:
        """Expert ids of this layer resident now, ascending."""
        return [expert for expert, slot in enumerate(self.expert2slot) if slot >= 0]


class ExpertCache:
    """Resident routed experts of every MoE layer within ``budget_bytes``; see the module docstring.

    ``layers`` are the decoder layer numbers (as in the store) of the MoE layers, in MoE-layer
    order: MoE-layer index i (``MoELayer.layer_index``, the first argument of ``observe``) is
    decoder layer ``layers[i]``. Experts are resident in ``dtype`` on ``device`` (default: the
    stored dtype, CPU); ``budget_bytes`` counts them in that dtype. ``top_k`` is the experts per
    token, which sets the minimum budget. ``host_budget_bytes`` adds a host tier
    (:class:`~moeserve.memory.host_tier.HostTier`) of that many bytes, counted in the stored
    dtype, between the checkpoint and the slots: pinned when ``device`` is CUDA, plain RAM
    otherwise; None reads the checkpoint straight into the slots (or their staging buffers).

    Raises :class:`ExpertBudgetError` when the budget cannot hold one layer's top-k experts
    (per layer: top-k in every layer) or the host budget one expert, ``KeyError`` for an unknown
    policy or a layer the store has no experts for, and ``ValueError`` for a policy that cannot
    run live (``needs_stream`` without a ``future``), or a shared cache over layers whose
    experts differ in shape.
    """

    def __init__(
        self,
        store: ExpertStore,
        layers: Sequence[int],
        budget_bytes: int,
        top_k: int,
        policy: str = "lru",
        *,
        per_layer: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        future: StepLog | None = None,
        record_steps: bool = False,
        host_budget_bytes: int | None = None,
    ) -> None:
        if not layers:
            raise ValueError("an expert cache needs at least one MoE layer")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.store = store
        self.decoder_layers = list(layers)
        self.budget_bytes = budget_bytes
        self.top_k = top_k
        self.policy_name = policy
        self.per_layer = per_layer
        self.device = torch.device(device)
        self.step_log: StepLog | None = [] if record_steps else None
        """Every step served, when constructed with ``record_steps=True`` (a ``future`` for belady)."""
        self._init_layers(dtype)
        self._init_capacity()
        self._init_host_tier(host_budget_bytes)
        self._init_pools(future)
        self.copier: SlotCopier = slot_copier(self.device)
        """Copies experts into slots: synchronously, or on a side CUDA stream (:mod:`moeserve.memory.transfer`)."""
        self._init_views()
        self._init_readers()
        self._counters = _Counters(len(self.decoder_layers))
        self._resident_bytes = 0
        self._max_resident_bytes = 0
        self._init_prefetch()

    # -- construction -----------------------------------------------------------------------

    def _init_layers(self, dtype: torch.dtype | None) -> None:
        self._specs = [self.store.layer_spec(layer) for layer in self.decoder_layers]
        self._dtypes = [dtype or spec.torch_dtype for spec in self._specs]
        self._slot_bytes = [
            3 * spec.intermediate_size * spec.hidden_size * resident.itemsize
            for spec, resident in zip(self._specs, self._dtypes, strict=True)
        ]
        self._key_offset: list[int] = []
        offset = 0
        for spec in self._specs:
            self._key_offset.append(0 if self.per_layer else offset)
            offset += spec.num_experts
        self.total_experts = offset
        self.total_expert_bytes = sum(
            spec.num_experts * nbytes for spec, nbytes in zip(self._specs, self._slot_bytes, strict=True)
        )
        """Bytes of every routed expert in the resident dtype (what 100% of the budget means)."""

    def _init_capacity(self) -> None:
        """Slots per pool: one pool of S slots, or the same count in every layer's pool."""
        k = self.top_k
        if self.per_layer:
            bytes_per_slot_row = sum(self._slot_bytes)  # one slot in every layer
            minimum = k * bytes_per_slot_row
            slots = self.budget_bytes // bytes_per_slot_row
            if slots < k:
                raise ExpertBudgetError(
                    f"expert memory budget of {self.budget_bytes} bytes ({format_bytes(self.budget_bytes)}) "
                    f"holds {slots} experts per layer; a per-layer cache needs at least top_k = {k} experts "
                    f"in each of {len(self._specs)} layers ({k * len(self._specs)} experts): the minimum is "
                    f"{minimum} bytes ({format_bytes(minimum)})"
                )
            self.capacities = [min(slots, spec.num_experts) for spec in self._specs]
            self.min_budget_bytes = minimum
            return
        shapes = {
            (spec.hidden_size, spec.intermediate_size, dtype)
            for spec, dtype in zip(self._specs, self._dtypes, strict=True)
        }
        if len(shapes) > 1:
            raise ValueError(
                f"a shared expert cache needs every layer's experts alike, got (D, I, dtype) {sorted(map(str, shapes))}; "
                "use a per-layer cache"
            )
        slot_bytes = self._slot_bytes[0]
        minimum = k * slot_bytes
        slots = self.budget_bytes // slot_bytes
        if slots < k:
            raise ExpertBudgetError(
                f"expert memory budget of {self.budget_bytes} bytes ({format_bytes(self.budget_bytes)}) holds "
                f"{slots} experts of {slot_bytes} bytes; each token needs its top_k = {k} experts of a layer "
                f"resident at once: the minimum is {k} experts = {minimum} bytes ({format_bytes(minimum)})"
            )
        self.capacities = [min(slots, self.total_experts)]
        self.min_budget_bytes = minimum

    def _init_host_tier(self, host_budget_bytes: int | None) -> None:
        """The host tier, when given a budget of at least one expert as stored (the largest)."""
        self._stored_shapes: list[ExpertShape] = [
            ((2 * spec.intermediate_size, spec.hidden_size), (spec.hidden_size, spec.intermediate_size), spec.torch_dtype)
            for spec in self._specs
        ]
        self.host_tier: HostTier | None = None
        """Experts kept in host memory between the checkpoint and the slots (None: reads go straight to the slots)."""
        if host_budget_bytes is None:
            return
        pin = self.device.type == "cuda"
        tier = HostTier(max(host_budget_bytes, 1), pin=pin, shapes=self._stored_shapes)
        stored = max(tier.charged_bytes(shape) for shape in self._stored_shapes)
        if host_budget_bytes < stored:
            kept = "as stored, in pinned blocks of a power of two bytes (the largest expert's)" if pin else "as stored"
            raise ExpertBudgetError(
                f"host memory budget of {host_budget_bytes} bytes ({format_bytes(host_budget_bytes)}) holds no "
                f"expert: the host tier keeps experts {kept}, and the minimum is one expert = {stored} bytes "
                f"({format_bytes(stored)})"
            )
        self.host_tier = tier

    def _init_pools(self, future: StepLog | None) -> None:
        policy_class = EVICTION_POLICIES.get(self.policy_name)
        if policy_class.needs_stream and (policy_class.online or future is None):
            reason = (
                "it reads the future: give the step_log of an identical earlier run as future"
                if not policy_class.online
                else "it needs the whole step stream in advance, which a live cache does not know"
            )
            raise ValueError(f"eviction policy {self.policy_name!r} cannot run in a live cache: {reason}")
        layer_ids = range(len(self._specs)) if self.per_layer else [None]
        self._pools: list[_SlotPool] = []
        for pool_index, layer in enumerate(layer_ids):
            members = list(range(len(self._specs))) if layer is None else [layer]
            spec, dtype = self._specs[members[0]], self._dtypes[members[0]]
            key_owner = [
                (member, expert) for member in members for expert in range(self._specs[member].num_experts)
            ]
            capacity = self.capacities[pool_index]
            pool = _SlotPool(
                index=pool_index,
                policy=policy_class(capacity, num_streams=len(members)),
                capacity=capacity,
                key_owner=key_owner,
                gate_up_shape=(2 * spec.intermediate_size, spec.hidden_size),
                down_shape=(spec.hidden_size, spec.intermediate_size),
                dtype=dtype,
                device=self.device,
            )
            if future is not None and not policy_class.online:
                pool.future = [
                    tuple(self._key_offset[layer_index] + expert for expert in experts)
                    for layer_index, experts in future
                    if layer_index in members
                ]
                pool.policy.prepare(pool.future)
            self._pools.append(pool)

    def _init_views(self) -> None:
        self._pool_of = [self._pools[i if self.per_layer else 0] for i in range(len(self._specs))]
        self.views = [
            CachedLayerExperts(self, i, spec.num_experts, self._pool_of[i])
            for i, spec in enumerate(self._specs)
        ]
        """One provider per MoE layer, in MoE-layer order."""

    def _init_readers(self) -> None:
        """Per layer: read straight into the slot, or through a staging buffer in the stored dtype
        (none with a host tier: its buffers are where reads land)."""
        self._staging: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for spec, dtype in zip(self._specs, self._dtypes, strict=True):
            direct = self.host_tier is not None or (dtype == spec.torch_dtype and self.device.type == "cpu")
            self._staging.append(
                None
                if direct
                else (
                    torch.empty((2 * spec.intermediate_size, spec.hidden_size), dtype=spec.torch_dtype),
                    torch.empty((spec.hidden_size, spec.intermediate_size), dtype=spec.torch_dtype),
                )
            )
        self.staging_bytes = sum(
            sum(t.numel() * t.element_size() for t in pair) for pair in self._staging if pair is not None
        )
        """Bytes of staging buffers (outside the budget; 0 when experts are resident as stored or with a host tier)."""

    def _init_prefetch(self) -> None:
        self._lock = threading.Condition()  # guards residency; notified when a prefetch read ends
        self._loader: ThreadPoolExecutor | None = None  # started by the first background prefetch
        self._prefetch_jobs: list[Future[Any]] = []  # submitted and not yet checked for errors
        self._predictions: list[set[int] | None] = [None] * len(self._specs)
        self._layer_calls = [0] * len(self._specs)  # a prefetch for a layer stops once it is called
        self._loader_staging = [
            None if pair is None else (torch.empty_like(pair[0]), torch.empty_like(pair[1]))
            for pair in self._staging
        ]
        self.on_close: list[Callable[[], None]] = []
        """Called first by ``close`` (e.g. to remove a prefetcher's hooks)."""

    # -- the step protocol ------------------------------------------------------------------

    def observe(self, layer_index: int, routing: RouterOutput) -> None:
        """Routing observer of MoE layer ``layer_index``: make the step's experts resident.

        Called by ``MoELayer.forward`` before dispatch. Experts of the step are pinned while it
        runs; a step wider than the cache is split (module docstring).
        """
        # One host sync per layer call; the per-expert backends make the same one for group sizes.
        experts = sorted(set(routing.executed_ids().tolist()))  # skipped zero-weight slots load nothing
        self._layer_calls[layer_index] += 1
        self._score_prediction(layer_index, experts)
        view = self.views[layer_index]
        capacity = self._pool_of[layer_index].capacity
        if len(experts) <= capacity:
            view.groups, view.next_group_first = [], view.num_experts
            self._serve(layer_index, experts)
            return
        self._counters.split_steps += 1
        groups = [experts[start : start + capacity] for start in range(0, len(experts), capacity)]
        view.groups, view.next_group_first = groups[1:], groups[1][0]
        self._serve(layer_index, groups[0])

    def request(self, layer_index: int, expert: int) -> None:
        """The experts stage asked for ``expert``, which is not resident or opens the next group.

        Serves the pending group holding ``expert`` (dropping groups the stage passed by); an
        expert the routing did not announce is served as a one-expert step.
        """
        view = self.views[layer_index]
        if not 0 <= expert < view.num_experts:
            raise IndexError(
                f"expert {expert} out of range: MoE layer {layer_index} has experts 0-{view.num_experts - 1}"
            )
        groups = view.groups
        while groups and groups[0][-1] < expert:
            groups.pop(0)
        if groups and groups[0][0] <= expert:
            self._serve(layer_index, groups.pop(0))
        view.next_group_first = groups[0][0] if groups else view.num_experts
        if view.expert2slot[expert] < 0:
            self._serve(layer_index, [expert])

    def _serve(self, layer_index: int, experts: list[int]) -> None:
        """One step: ``experts`` (ascending, distinct, at most the pool's capacity) become resident together.

        Steps: 1. pin the step and wait for its experts still loading; 2. split hits from
        misses; 3. evict what the misses do not fit, never the step's own experts (after any
        other in-flight prefetch lands, so the policy knows every resident key); 4. load the
        misses; 5. tell the policy.
        """
        pool = self._pool_of[layer_index]
        view = self.views[layer_index]
        offset = self._key_offset[layer_index]
        keys = [offset + expert for expert in experts]
        counters = self._counters
        with self._lock:
            time = pool.time
            if pool.future is not None:
                self._check_future(pool, keys, time)
            if self.step_log is not None:
                self.step_log.append((layer_index, tuple(experts)))
            # 1.
            pool.pinned = set(keys)
            waiting = [key for key in keys if key in pool.loading]
            if waiting:
                started = clock.perf_counter()
                # All the step's keys: while the lock is released a background load may start
                # another of them, which must land before step 2 decides what to load here.
                self._lock.wait_for(lambda: pool.loading.isdisjoint(keys))
                counters.stall_seconds += clock.perf_counter() - started
                counters.prefetch_waits += len(waiting)
            # 2.
            key2slot = pool.key2slot
            missing = [key for key in keys if key not in key2slot]
            used = pool.prefetched.intersection(keys)
            counters.prefetch_used += len(used)
            pool.prefetched -= used
            counters.steps += 1
            stalled = len(missing) + sum(1 for key in waiting if key in key2slot)
            counters.layer_hits[layer_index] += len(keys) - stalled
            counters.layer_misses[layer_index] += stalled
            if missing:
                started = clock.perf_counter()
                # 3.
                if len(key2slot) + len(pool.loading) + len(missing) > pool.capacity:
                    self._lock.wait_for(lambda: not pool.loading)
                    # While the lock was released, background loads (load_in_background of one of them)
                    # may have made some of the step's experts resident: load only the rest.
                    missing = [key for key in missing if key not in key2slot]
                    overflow = len(key2slot) + len(missing) - pool.capacity
                    if overflow > 0:
                        self._evict(pool, overflow, set(keys), time)
                # 4.
                for key in missing:
                    slot = pool.take_slot()
                    self._read(layer_index, key - offset, slot, self._staging[layer_index])
                    key2slot[key] = slot
                    view.expert2slot[key - offset] = slot
                counters.stall_seconds += clock.perf_counter() - started
                counters.loads += len(missing)
                self._resident_bytes += len(missing) * pool.slot_bytes
                self._max_resident_bytes = max(self._max_resident_bytes, self._resident_bytes)
                assert self._resident_bytes <= self.budget_bytes, "resident experts exceed the budget"
            # 5.
            pool.policy.on_step(keys, missing, time)
            pool.time = time + 1

    # -- prefetch ---------------------------------------------------------------------------

    def prefetch(self, layer_index: int, experts: Sequence[int], background: bool = True) -> None:
        """Predict that MoE layer ``layer_index``'s next step routes ``experts``; load them ahead.

        The prediction is scored when the layer's next step comes. Loads run on the background
        loader (``background``) or here, before returning (a deterministic reference: no
        stall is counted for them). Loads stop when the layer's next step begins, or when no
        slot can be freed without evicting a pinned, loading or predicted expert. Experts
        beyond the pool's capacity are not loaded (ascending order decides which).
        """
        if not EVICTION_POLICIES.get(self.policy_name).online:
            raise ValueError(f"prefetch needs an online eviction policy, not {self.policy_name!r}")
        predicted = sorted(set(experts))
        num_experts = self.views[layer_index].num_experts
        if predicted and not (0 <= predicted[0] and predicted[-1] < num_experts):
            raise IndexError(f"predicted experts {predicted} out of range 0-{num_experts - 1}")
        self._predictions[layer_index] = set(predicted)
        call = self._layer_calls[layer_index]
        if not background:
            self._prefetch_job(layer_index, predicted, call)
            return
        self._submit_background(self._prefetch_job, layer_index, predicted, call)

    def _submit_background(self, job: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``job(*args)`` on the one background loader thread (started on first use), in order."""
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeserve-prefetch")
        self._prefetch_jobs = [done for done in self._prefetch_jobs if not done.done() or done.exception() is not None]
        future = self._loader.submit(job, *args)
        self._prefetch_jobs.append(future)
        return future

    def wait_for_prefetch(self) -> None:
        """Block until every prefetch submitted so far has finished; re-raise the first that failed."""
        jobs, self._prefetch_jobs = self._prefetch_jobs, []
        for job in jobs:
            job.result()

    def load_in_background(self, layer_index: int, expert: int, keep: Collection[int] = ()) -> Future[Any]:
        """Make ``expert`` of MoE layer ``layer_index`` resident on the background loader, evicting
        none of ``keep`` (experts of the same layer) to fit it.

        Not a prediction (nothing is scored, and the next step does not cancel it): a parameter
        committee's swap uses it to load an incoming member while the step loop goes on. Gives
        up, leaving the expert absent, when no slot can be freed without evicting a pinned,
        loading or kept expert; ``is_resident`` tells whether it landed (the returned future is
        done when the attempt is over). Needs an online policy.
        """
        if not EVICTION_POLICIES.get(self.policy_name).online:
            raise ValueError(f"background loads need an online eviction policy, not {self.policy_name!r}")
        num_experts = self.views[layer_index].num_experts
        if not 0 <= expert < num_experts or any(not 0 <= kept < num_experts for kept in keep):
            raise IndexError(f"experts {expert}, {sorted(keep)} out of range 0-{num_experts - 1}")
        offset = self._key_offset[layer_index]
        protected = {offset + kept for kept in keep} | {offset + expert}
        return self._submit_background(self._load_one, layer_index, expert, protected, False)

    def is_resident(self, layer_index: int, expert: int) -> bool:
        """Whether ``expert`` of MoE layer ``layer_index`` is resident now (not loading)."""
        return self.views[layer_index].expert2slot[expert] >= 0

    def _prefetch_job(self, layer_index: int, experts: list[int], call: int) -> None:
        """Load ``experts`` of ``layer_index`` one at a time, until the layer's next step begins."""
        offset = self._key_offset[layer_index]
        job_keys = {offset + expert for expert in experts}
        for expert in experts:
            if not self._load_one(layer_index, expert, job_keys, True, call):
                return

    def _load_one(self, layer_index: int, expert: int, protected: set[int], predicted: bool,
                  call: int | None = None) -> bool:
        """Load one expert on the loader thread: reserve a slot under the lock (evicting none of
        ``protected``, the pinned or the loading), read outside it. False: stop (the layer's
        ``call`` is over, or nothing can be evicted); True: resident or loaded."""
        pool = self._pool_of[layer_index]
        view = self.views[layer_index]
        key = self._key_offset[layer_index] + expert
        with self._lock:
            if call is not None and self._layer_calls[layer_index] != call:
                return False
            if key in pool.key2slot or key in pool.loading:
                return True
            if len(pool.key2slot) + len(pool.loading) >= pool.capacity:
                keep = pool.pinned | pool.loading | protected
                if all(resident in keep for resident in pool.key2slot):
                    return False
                self._evict(pool, 1, keep, pool.time)
            slot = pool.take_slot()
            pool.loading.add(key)
            self._resident_bytes += pool.slot_bytes
            self._max_resident_bytes = max(self._max_resident_bytes, self._resident_bytes)
            assert self._resident_bytes <= self.budget_bytes, "resident experts exceed the budget"
        try:
            self._read(layer_index, expert, slot, self._loader_staging[layer_index])
        except BaseException:
            with self._lock:
                pool.loading.discard(key)
                pool.free.append(slot)
                self._resident_bytes -= pool.slot_bytes
                self._lock.notify_all()
            raise
        with self._lock:
            pool.loading.discard(key)
            pool.key2slot[key] = slot
            view.expert2slot[expert] = slot
            if predicted:
                pool.prefetched.add(key)
                self._counters.prefetch_loads += 1
            pool.policy.on_step([key], [key], pool.time)
            self._counters.loads += 1
            self._lock.notify_all()
        return True

    def _score_prediction(self, layer_index: int, experts: list[int]) -> None:
        predicted = self._predictions[layer_index]
        if predicted is None:
            return
        self._predictions[layer_index] = None
        counters = self._counters
        counters.predicted += len(predicted)
        counters.predicted_actual += len(experts)
        counters.predicted_correct += len(predicted.intersection(experts))

    def _evict(self, pool: _SlotPool, count: int, pinned: set[int], time: int) -> None:
        victims = pool.policy.evict(count, pinned, time)
        if len(victims) != count or len(set(victims)) != count:
            raise PolicyContractError(
                f"{type(pool.policy).__name__} returned {victims} at step {time}; asked for {count} distinct keys"
            )
        for key in victims:
            if key in pinned or key not in pool.key2slot:
                state = "is needed by the current step" if key in pinned else "is not resident"
                raise PolicyContractError(
                    f"{type(pool.policy).__name__} evicted key {key} at step {time}, which {state}"
                )
            slot = pool.key2slot.pop(key)
            pool.prefetched.discard(key)
            pool.free.append(slot)
            self.copier.slot_freed(pool.index, slot)
            layer_index, expert = pool.key_owner[key]
            self.views[layer_index].expert2slot[expert] = -1
        self._counters.evictions += count
        self._resident_bytes -= count * pool.slot_bytes

    def _read(
        self, layer_index: int, expert: int, slot: int, staging: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        """Load one expert into ``slot``: through the host tier when there is one, else from the
        checkpoint straight into the slot or through ``staging`` (owned by the calling thread)."""
        pool = self._pool_of[layer_index]
        decoder_layer = self.decoder_layers[layer_index]
        target = (pool.gate_up[slot], pool.down[slot])
        host_hit = False
        if self.host_tier is not None:
            host_hit = self._read_through_host(layer_index, expert, pool.index, slot)
        elif staging is None:
            self.store.read_expert_into(decoder_layer, expert, *target)
        else:
            self.store.read_expert_into(decoder_layer, expert, *staging)
            self.copier.copy(pool.index, slot, target, staging)  # a pageable source is consumed on return
        # Only now the cache's lock: the forward thread may hold it while it waits for a host buffer.
        with self._lock:
            if host_hit:
                self._counters.host_hits += 1
            else:
                self._counters.bytes_read += self.store.expert_nbytes(decoder_layer, expert)

    def _read_through_host(self, layer_index: int, expert: int, pool_index: int, slot: int) -> bool:
        """Copy the expert from its host buffer into the slot, reading the checkpoint into one first
        when the host tier does not hold it. True: a host hit."""
        assert self.host_tier is not None
        pool = self._pool_of[layer_index]
        key = (layer_index, expert)
        buffer, hit = self.host_tier.acquire(key, self._stored_shapes[layer_index])
        filled, copy = hit, None
        try:
            if not hit:
                self.store.read_expert_into(self.decoder_layers[layer_index], expert, buffer.gate_up, buffer.down)
                filled = True
            copy = self.copier.copy(pool_index, slot, (pool.gate_up[slot], pool.down[slot]), (buffer.gate_up, buffer.down))
        finally:
            self.host_tier.release(key, buffer, copy, filled)
        return hit

    def _check_future(self, pool: _SlotPool, keys: list[int], time: int) -> None:
        assert pool.future is not None
        expected = pool.future[time] if time < len(pool.future) else None
        if expected != tuple(keys):
            raise MoeserveError(
                f"policy {self.policy_name!r} was given a future that this run left at step {time}: "
                f"expected keys {expected}, got {tuple(keys)}; record the future from an identical run"
            )

    # -- state and counters -----------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of the experts resident now (filled slots x expert bytes)."""
        return self._resident_bytes

    @property
    def max_resident_bytes(self) -> int:
        """High-water mark of ``resident_bytes`` since construction or ``reset_stats``."""
        return self._max_resident_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of slot buffers allocated (slots are kept for reuse): >= resident, <= budget."""
        return sum(len(pool.gate_up) * pool.slot_bytes for pool in self._pools)

    @property
    def capacity(self) -> int:
        """Experts the cache holds at once, over all layers."""
        return sum(pool.capacity for pool in self._pools)

    def expert_bytes(self, layer_index: int) -> int:
        """Bytes one resident expert of MoE layer ``layer_index`` occupies."""
        return self._slot_bytes[layer_index]

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> CacheStats:
        counters = self._counters
        host = None if self.host_tier is None else self.host_tier.stats()
        hits, misses = sum(counters.layer_hits), sum(counters.layer_misses)
        return CacheStats(
            steps=counters.steps,
            hits=hits,
            misses=misses,
            loads=counters.loads,
            evictions=counters.evictions,
            bytes_read=counters.bytes_read,
            stall_seconds=counters.stall_seconds,
            split_steps=counters.split_steps,
            resident_bytes=self._resident_bytes,
            max_resident_bytes=self._max_resident_bytes,
            budget_bytes=self.budget_bytes,
            prefetch_loads=counters.prefetch_loads,
            prefetch_used=counters.prefetch_used,
            prefetch_waits=counters.prefetch_waits,
            predicted=counters.predicted,
            predicted_actual=counters.predicted_actual,
            predicted_correct=counters.predicted_correct,
            layer_hits=tuple(counters.layer_hits),
            layer_misses=tuple(counters.layer_misses),
            device=str(self.device),
            copier=self.copier.name,
            host_tier="none" if self.host_tier is None else self.host_tier.kind,
            host_hits=counters.host_hits,
            host_evictions=0 if host is None else host.evictions,
            host_resident_bytes=0 if host is None else host.resident_bytes,
            max_host_resident_bytes=0 if host is None else host.max_resident_bytes,
            host_budget_bytes=0 if host is None else host.budget_bytes,
        )

    def reset_stats(self) -> None:
        """Zero the counters and restart the high-water mark from what is resident now (residency stays).

        Waits for prefetches in flight first, so none lands in the new counters' account.
        """
        self.wait_for_prefetch()
        self._counters = _Counters(len(self.decoder_layers))
        self._max_resident_bytes = self._resident_bytes
        if self.host_tier is not None:
            self.host_tier.reset_stats()

    def close(self) -> None:
        """Drop every slot (the cache holds nothing afterwards; its views must not be used again)."""
        for callback in self.on_close:
            callback()
        self.on_close.clear()
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None
        self.copier.close()
        if self.host_tier is not None:
            self.host_tier.close()
        for pool in self._pools:
            pool.release()
        for view in self.views:
            view.expert2slot = [-1] * view.num_experts
            view.groups, view.next_group_first = [], view.num_experts
        self._resident_bytes = 0

    def __repr__(self) -> str:
        scope = "per-layer" if self.per_layer else "shared"
        host = "" if self.host_tier is None else (
            f", host tier={self.host_tier.kind} {format_bytes(self.host_tier.budget_bytes)}"
        )
        return (
            f"ExpertCache({scope}, policy={self.policy_name!r}, device={self.device}, "
            f"budget={format_bytes(self.budget_bytes)}, capacity={self.capacity} of {self.total_experts} experts, "
            f"resident={format_bytes(self._resident_bytes)}{host})"
        )
