"""Copies into an expert cache's resident slots: synchronous off CUDA, on a side stream on a GPU.

An :class:`~moeserve.memory.cache.ExpertCache` chooses one copier at construction
(:func:`slot_copier`, from its device) and sends every copy of an expert into a resident slot
through it (from a staging buffer or a host-tier buffer; a read straight into a CPU slot needs
no copy). A slot is named by its pool and its index there.

* :class:`SynchronousCopier` (CPU and any non-CUDA device): ``slot.copy_(source)``; the slot
  holds the expert when the call returns. The plain reference for the CUDA copier.
* :class:`CudaStreamCopier` (CUDA): one side ``torch.cuda.Stream`` carries every copy, from
  the forward's thread and from the cache's background loader alike, with ``non_blocking=True``
  (an asynchronous DMA when the source is pinned host memory). Three orderings keep it exact,
  each a wait enqueued on a stream, never a host synchronisation:

  1. *ready*: an event recorded after each copy marks its slot; ``wait_ready`` (called by the
     forward thread just before it hands a slot's tensors to the experts stage) makes the
     compute stream (that thread's current stream) wait on the slot's pending event.
  2. *freed*: ``slot_freed`` (called when a slot is evicted) records an event on the compute
     stream; the next copy into that slot makes the side stream wait on it, so the copy cannot
     overwrite weights that kernels enqueued earlier still read.
  3. *source*: ``copy`` returns its event; whoever owns the source buffer must not rewrite it
     before the event completes (the host tier synchronises on it before reusing a buffer).

  A copy that changes dtype (checkpoint in fp32, model in bf16) is converted on the GPU: torch
  copies the stored bytes into a temporary on the side stream (one expert, outside the budget)
  and converts it there.

This module knows nothing of eviction policies, the store or the host tier's budget. The CUDA
copier assumes one compute stream (the forward thread's current stream; it is re-read at every
``wait_ready``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

SlotPair = tuple[torch.Tensor, torch.Tensor]
"""An expert's (gate_up [2I, D], down [D, I]) tensors."""


class CopyDone(Protocol):
    """What a copy returns to mark its completion (a ``torch.cuda.Event``)."""

    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


class SlotCopier(Protocol):
    """How experts reach resident slots on one device; see the module docstring."""

    name: str
    """``synchronous`` or ``cuda-stream``."""

    def copy(self, pool: int, slot: int, target: SlotPair, source: SlotPair) -> CopyDone | None:
        """Copy ``source`` into slot ``slot`` of pool ``pool`` (its tensors ``target``); None: done on return."""
        ...

    def slot_freed(self, pool: int, slot: int) -> None:
        """The slot was evicted: its next copy must not overtake compute enqueued until now."""
        ...

    def wait_ready(self, pool: int, slots: Sequence[int]) -> None:
        """The calling thread is about to compute with these slots: order it after their copies."""
        ...

    def close(self) -> None:
        """Wait for every copy in flight (before the slots are freed)."""
        ...


class SynchronousCopier:
    """``slot.copy_(source)`` on the calling thread; nothing is ever in flight."""

    name = "synchronous"

    def copy(self, pool: int, slot: int, target: SlotPair, source: SlotPair) -> CopyDone | None:
        target[0].copy_(source[0])
        target[1].copy_(source[1])
        return None

    def slot_freed(self, pool: int, slot: int) -> None:
        pass

    def wait_ready(self, pool: int, slots: Sequence[int]) -> None:
        pass

    def close(self) -> None:
        pass


class CudaStreamCopier:
    """Copies on one side CUDA stream, ordered against compute by events; see the module docstring."""

    name = "cuda-stream"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        """The side stream every copy runs on."""
        self._compute = torch.cuda.current_stream(device)  # the stream evictions are ordered after
        self._ready: dict[tuple[int, int], torch.cuda.Event] = {}  # copies compute has not waited on yet
        self._freed: dict[tuple[int, int], torch.cuda.Event] = {}  # evictions the next copy must wait on

    def copy(self, pool: int, slot: int, target: SlotPair, source: SlotPair) -> CopyDone | None:
        freed = self._freed.pop((pool, slot), None)
        with torch.cuda.stream(self.stream):
            if freed is not None:
                self.stream.wait_event(freed)
            target[0].copy_(source[0], non_blocking=True)
            target[1].copy_(source[1], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._ready[(pool, slot)] = done
        return done

    def slot_freed(self, pool: int, slot: int) -> None:
        # May run on the loader thread: record on the forward's compute stream, not this thread's.
        freed = torch.cuda.Event()
        freed.record(self._compute)
        self._freed[(pool, slot)] = freed
        # A copy no use waited for needs no waiting now: the next copy follows it on the side stream.
        self._ready.pop((pool, slot), None)

    def wait_ready(self, pool: int, slots: Sequence[int]) -> None:
        for slot in slots:
            ready = self._ready.pop((pool, slot), None)
            if ready is not None:  # else: compute already waited for the slot's last copy
                compute = torch.cuda.current_stream(self.device)
                self._compute = compute
                compute.wait_event(ready)

    def close(self) -> None:
        self.stream.synchronize()
        self._ready.clear()
        self._freed.clear()


def slot_copier(device: torch.device) -> SlotCopier:
    """The copier for slots on ``device``: the side-stream one on CUDA, the synchronous one elsewhere."""
    if device.type == "cuda":
        return CudaStreamCopier(device)
    return SynchronousCopier()
