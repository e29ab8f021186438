"""The host tier of an expert cache: experts read from the checkpoint, kept in host memory under a byte budget.

It sits between the :class:`~moeserve.memory.store.ExpertStore` (disk) and the cache's resident
slots. A miss of the resident slots asks the host tier for the expert: held here, it is a *host
hit* (no disk read); otherwise the checkpoint is read into a host buffer first, which then
stays, so the next miss of the same expert is a hit. Buffers hold an expert as stored (the
checkpoint's dtype: the read is one copy into them; the copy to the slot converts).

Buffers are pinned (page-locked, ``torch.empty(..., pin_memory=True)``) when the cache's device
is CUDA, so the copy to the device is an asynchronous DMA on the side stream; plain tensors
otherwise, where the tier is a second RAM tier: it saves the disk (or page-cache) reads, not the
copy into the resident slot.

Eviction is LRU over held experts no thread is using. An expert is *in use* from ``acquire``
until ``release``: the thread reads the checkpoint into it (a miss) and copies it into a slot.
Each ``release`` hands over that copy's event (None when it completed); a buffer is rewritten
only after its copies' events complete, the one host synchronisation of the GPU path, taken only
when a buffer is reused. Bytes: every buffer allocated (held experts and free buffers kept for
reuse, as pinned allocation is slow) counts, and never exceeds the budget. A buffer is one
allocation, a block of bytes that both tensors view. Pinned, a block is charged what the pinned
allocator takes for it: PyTorch's caching host allocator rounds each block up to a power of two
and keeps freed blocks for reuse, so a pinned tier never frees a block: given the model's
expert ``shapes``, every block has the size of the largest (rounded), and any free block serves
any shape (*uniform* blocks; the default when pinned). Without uniform blocks a free buffer of
another shape is freed to make room.

Thread-safe (its own lock). The cache's forward thread and its background loader each hold at
most one expert at a time and take no other lock while holding it, so a budget of one expert
(the largest) always makes progress. This module knows nothing of eviction policies of the
resident slots, streams or the checkpoint's layout.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from moeserve.memory.transfer import CopyDone

ExpertShape = tuple[tuple[int, int], tuple[int, int], torch.dtype]
"""(gate_up shape [2I, D], down shape [D, I], stored dtype) of one expert."""


@dataclass(eq=False)
class HostBuffer:
    """One expert's host tensors, as stored: ``gate_up`` [2I, D], ``down`` [D, I], views of ``block``."""

    gate_up: torch.Tensor
    down: torch.Tensor
    shape: ExpertShape
    nbytes: int
    """Bytes it counts against the budget (see :meth:`HostTier.charged_bytes`)."""
    block: torch.Tensor
    """uint8 [nbytes or more]: the one allocation both tensors view."""
    copies: list[CopyDone] = field(default_factory=list)
    """Copies from this buffer that may still be running (pruned as they complete)."""

    @classmethod
    def over(cls, block: torch.Tensor, shape: ExpertShape, nbytes: int) -> HostBuffer:
        """Views of ``shape``'s two tensors at the start of ``block`` (uint8, large enough)."""
        (rows, columns), down_shape, dtype = shape
        split = rows * columns * dtype.itemsize  # a multiple of the element size: the view is aligned
        end = _nbytes(shape)
        gate_up = block[:split].view(dtype).view(rows, columns)
        down = block[split:end].view(dtype).view(down_shape)
        return cls(gate_up, down, shape, nbytes, block)


@dataclass(frozen=True)
class HostTierStats:
    """Counters of a :class:`HostTier` since construction or ``reset_stats``."""

    hits: int
    """Experts handed out already held (no disk read)."""
    loads: int
    """Experts read from the checkpoint into a host buffer."""
    evictions: int
    resident_bytes: int
    """Bytes of the experts held now."""
    max_resident_bytes: int
    """High-water mark of ``resident_bytes``."""
    allocated_bytes: int
    """Bytes of every buffer allocated (held and free): >= resident, <= budget."""
    budget_bytes: int


class HostTier:
    """Experts in host memory within ``budget_bytes``, LRU; see the module docstring.

    ``pin``: allocate page-locked buffers (needs CUDA). ``shapes``: the expert shapes that will be
    asked for; with ``uniform`` blocks (default: ``pin``) every block fits the largest of them.
    Keys are any hashable the caller uses to name an expert (the cache uses (MoE-layer index, expert)).
    """

    def __init__(
        self, budget_bytes: int, pin: bool, shapes: Sequence[ExpertShape] = (), uniform: bool | None = None
    ) -> None:
        if budget_bytes < 1:
            raise ValueError(f"host tier budget must be at least 1 byte, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.pin = pin
        self.uniform = pin if uniform is None else uniform
        self.block_bytes = max((self._block_size(shape) for shape in shapes), default=0) if self.uniform else 0
        """Bytes of every block with uniform blocks (0: a block per shape, its own size)."""
        self.kind = "pinned" if pin else "ram"
        """``pinned`` (page-locked, in front of a GPU) or ``ram`` (plain memory, a second RAM tier)."""
        self._lock = threading.Condition(threading.Lock())
        self._held: OrderedDict[Hashable, HostBuffer] = OrderedDict()  # least recently used first
        self._users: Counter[Hashable] = Counter()  # threads holding each key (acquire..release)
        self._filling: set[Hashable] = set()  # keys whose checkpoint read is under way
        self._free: dict[ExpertShape | None, list[HostBuffer]] = {}  # evicted buffers kept for reuse
        self._allocated_bytes = 0
        self._resident_bytes = 0
        self._max_resident_bytes = 0
        self._hits = self._loads = self._evictions = 0

    def _block_size(self, shape: ExpertShape) -> int:
        nbytes = _nbytes(shape)
        return 1 << (nbytes - 1).bit_length() if self.pin else nbytes

    def charged_bytes(self, shape: ExpertShape) -> int:
        """Bytes a buffer for ``shape`` counts against the budget: its block's (pinned: rounded up to a
        power of two; uniform blocks: the largest shape's)."""
        return max(self.block_bytes, self._block_size(shape))

    def _free_key(self, shape: ExpertShape) -> ExpertShape | None:
        """Where free buffers of ``shape`` are kept: with uniform blocks one list serves every shape."""
        return None if self.block_bytes else shape

    def acquire(self, key: Hashable, shape: ExpertShape) -> tuple[HostBuffer, bool]:
        """Hold ``key``'s expert: (its buffer, True) when held (a hit), else (a buffer to read it into, False).

        After a miss the caller reads the checkpoint into the buffer; either way it then copies
        from it and calls ``release`` once. Waits while another thread reads the same key, or
        while every buffer is in use and the budget has no room. ``ValueError`` for an expert
        larger than the whole budget.
        """
        nbytes = self.charged_bytes(shape)
        if nbytes > self.budget_bytes:
            raise ValueError(
                f"an expert taking {nbytes} bytes{' pinned' if self.pin else ''} does not fit the host tier's budget "
                f"of {self.budget_bytes} bytes"
            )
        with self._lock:
            while True:
                held = self._held.get(key)
                if held is not None and key not in self._filling:
                    self._users[key] += 1
                    self._held.move_to_end(key)
                    self._hits += 1
                    return held, True
                if held is None:
                    buffer = self._take_buffer(shape, nbytes)
                    if buffer is not None:
                        break
                self._lock.wait()  # a read of this key, or a release freeing room
            self._held[key] = buffer
            self._users[key] += 1
            self._filling.add(key)
            self._loads += 1
            self._resident_bytes += nbytes
            self._max_resident_bytes = max(self._max_resident_bytes, self._resident_bytes)
            assert self._allocated_bytes <= self.budget_bytes, "host buffers exceed the host budget"
            pending, buffer.copies = buffer.copies, []
        # The buffer's earlier expert may still be on its way to a device slot: let it land first.
        for copy in pending:
            copy.synchronize()
        return buffer, False

    def release(self, key: Hashable, buffer: HostBuffer, copy: CopyDone | None, filled: bool = True) -> None:
        """End a hold from ``acquire``: ``copy`` is the event of the copy made from the buffer (None:
        complete). ``filled=False``: the checkpoint read of a miss failed; the expert is dropped."""
        with self._lock:
            if copy is not None:
                buffer.copies = [pending for pending in buffer.copies if not pending.query()]
                buffer.copies.append(copy)
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
            if key in self._filling:
                self._filling.discard(key)
                if not filled:
                    self._drop(key)
            self._lock.notify_all()

    def _take_buffer(self, shape: ExpertShape, nbytes: int) -> HostBuffer | None:
        """A buffer of ``shape`` within the budget (reused, or allocated after evicting); None: wait."""
        while True:
            free = self._free.get(self._free_key(shape))
            if free:
                buffer = free.pop()
                if buffer.shape != shape:  # a uniform block: view it as this shape, keep its pending copies
                    buffer = dataclasses.replace(HostBuffer.over(buffer.block, shape, nbytes), copies=buffer.copies)
                return buffer
            if self._allocated_bytes + nbytes <= self.budget_bytes:
                break
            other = None if self.pin else next(
                (buffers for kept, buffers in self._free.items() if buffers and kept != self._free_key(shape)), None
            )
            if other is not None:  # a free buffer of another shape: give its memory back
                self._allocated_bytes -= other.pop().nbytes
                continue
            victim = next((key for key in self._held if key not in self._users), None)  # LRU first
            if victim is None:
                if not self._users:  # nothing will be released: only free buffers of other shapes (pinned)
                    raise RuntimeError(
                        f"the pinned host tier's budget of {self.budget_bytes} bytes is taken by free buffers of "
                        f"other expert shapes; it needs room for one more of {nbytes} bytes (give HostTier the "
                        "model's shapes for uniform blocks)"
                    )
                return None
            self._drop(victim)
            self._evictions += 1
        with torch.inference_mode(False):
            block = torch.empty(max(nbytes, _nbytes(shape)), dtype=torch.uint8, pin_memory=self.pin)
            buffer = HostBuffer.over(block, shape, nbytes)
        self._allocated_bytes += nbytes
        return buffer

    def _drop(self, key: Hashable) -> HostBuffer:
        buffer = self._held.pop(key)
        self._resident_bytes -= buffer.nbytes
        self._free.setdefault(self._free_key(buffer.shape), []).append(buffer)
        return buffer

    # -- state and counters -----------------------------------------------------------------

    def holds(self, key: Hashable) -> bool:
        """Whether ``key``'s expert is held (read completely)."""
        with self._lock:
            return key in self._held and key not in self._filling

    def buffers(self) -> list[HostBuffer]:
        """Every buffer allocated now, held or free."""
        with self._lock:
            return self._all_buffers()

    def _all_buffers(self) -> list[HostBuffer]:
        return list(self._held.values()) + [buffer for free in self._free.values() for buffer in free]

    def stats(self) -> HostTierStats:
        with self._lock:
            return HostTierStats(
                hits=self._hits,
                loads=self._loads,
                evictions=self._evictions,
                resident_bytes=self._resident_bytes,
                max_resident_bytes=self._max_resident_bytes,
                allocated_bytes=self._allocated_bytes,
                budget_bytes=self.budget_bytes,
            )

    def reset_stats(self) -> None:
        """Zero the counters; the high-water mark restarts from what is held now."""
        with self._lock:
            self._hits = self._loads = self._evictions = 0
            self._max_resident_bytes = self._resident_bytes

    def close(self) -> None:
        """Drop every buffer (after their copies complete)."""
        with self._lock:
            for buffer in self._all_buffers():
                for copy in buffer.copies:
                    copy.synchronize()
            self._held.clear()
            self._free.clear()
            self._users.clear()
            self._filling.clear()
            self._allocated_bytes = self._resident_bytes = 0


def _nbytes(shape: ExpertShape) -> int:
    (rows, columns), (hidden, inner), dtype = shape
    return (rows * columns + hidden * inner) * dtype.itemsize
