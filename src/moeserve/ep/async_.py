"""async mode: micro-batches in flight at the attention worker, mu-queues at the expert workers.

Attention worker (rank 0). Each micro-batch runs the model's own forward in its own thread, but
only one thread computes at a time: :class:`AsyncAttention` hands the single compute slot to a
ready micro-batch, which runs until its next MoE layer, sends a :class:`Dispatch` to every
expert worker with rows for it, and gives the slot back. While it waits, other micro-batches
run their attention; arriving :class:`Combine` messages make their micro-batch ready again. The
attention worker idles only when no micro-batch is ready.

Expert worker. Dispatches go into one mu-queue per MoE layer. Whenever the worker is free it
takes every message that has arrived (its doorbell says which, without waiting; see
:mod:`moeserve.ep.serialize`), marks the layers it may run (something queued, and at
least ``hold`` rows per held expert or the oldest entry older than ``flush_after_s``), asks the
layer scheduler (``moeserve.sim.schedulers.LAYER_SCHEDULERS``) which one, re-batches everything
queued for that layer into one invocation, and sends each micro-batch its rows back.

Why threads for micro-batches: the model's forward is the checkpoint's own and cannot pause at
a MoE layer, so each micro-batch's forward runs in a thread that blocks there; the hand-over
costs two thread wake-ups per slice (~60 us measured here), and only one thread ever runs.

Shape legend: N rows of a layer call, n rows of one message, D hidden, L MoE layers, E experts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from moeserve.ep.dispatch import DispatchPlan
from moeserve.ep.experts import ExpertShard
from moeserve.ep.faults import FailurePoint
from moeserve.ep.messages import Combine, Dispatch, Shutdown, Stopped
from moeserve.ep.metrics import AttentionStats, ExpertStats
from moeserve.ep.serialize import Doorbell, InboxSet, Outbox
from moeserve.sim.schedulers import DEFRAG_HISTORY, LAYER_SCHEDULERS, QueueSnapshot

# --------------------------------------------------------------------------------------------
# attention side


@dataclass
class _Pending:
    """Outputs of one micro-batch's layer call, filled as Combine messages arrive."""

    layer: int
    outputs: torch.Tensor  # [N, D]
    offsets: list[int]  # [W + 1] first row of each worker's block
    remaining: int


class _MicroBatch:
    """One micro-batch's thread; it runs only while it holds the compute slot."""

    def __init__(self, index: int, body: Callable[[], None], handed_back: threading.Event) -> None:
        self.index = index
        self.resume = threading.Event()
        self.handed_back = handed_back
        self.done = False
        self.error: BaseException | None = None
        self.pending: _Pending | None = None
        self.thread = threading.Thread(
            target=self._run, args=(body,), name=f"micro-batch-{index}", daemon=True
        )

    def _run(self, body: Callable[[], None]) -> None:
        _current.task = self
        self._wait_turn()
        try:
            with torch.inference_mode():
                body()
        except BaseException as error:  # handed to the attention loop, which re-raises it
            self.error = error
        finally:
            self.done = True
            self.handed_back.set()

    def _wait_turn(self) -> None:
        self.resume.wait()
        self.resume.clear()

    def hand_back_and_wait(self) -> None:
        """Give the compute slot back and sleep until the attention loop resumes this micro-batch."""
        self.handed_back.set()
        self._wait_turn()


_current = threading.local()


class AsyncAttention:
    """Attention side of the async mode; also the :class:`~moeserve.ep.remote.Exchange` the layers call."""

    def __init__(
        self,
        world_size: int,
        stats: AttentionStats,
        doorbell: Doorbell,
        capacity: int,
        depth: int,
        timeout_s: float,
    ) -> None:
        self.world_size = world_size
        self.stats = stats
        self.outbox = Outbox(rank=0, depth=depth, doorbell=doorbell)
        self.inbox = InboxSet(doorbell, list(range(1, world_size)), capacity, depth, timeout_s)
        self._handed_back = threading.Event()
        self._micro_batches: list[_MicroBatch] = []
        self._ready: deque[_MicroBatch] = deque()

    def exchange(self, plan: DispatchPlan) -> torch.Tensor:
        """Called from a micro-batch thread: dispatch, yield the compute slot, return the outputs."""
        task: _MicroBatch = _current.task
        rows = plan.groups.rows  # [N, D]
        offsets = plan.worker_offsets
        senders = 0
        for worker, count in enumerate(plan.worker_counts):
            if count:
                block = slice(offsets[worker], offsets[worker + 1])
                self.outbox.send(
                    Dispatch(task.index, plan.layer, rows[block], plan.row_expert[block]), worker + 1
                )
                senders += 1
        task.pending = _Pending(plan.layer, torch.empty_like(rows), offsets, senders)
        task.hand_back_and_wait()
        outputs = task.pending.outputs
        task.pending = None
        return outputs

    def run(self, bodies: list[Callable[[], None]]) -> None:
        """Run every micro-batch body to the end, interleaved at MoE layers; re-raise the first error."""
        self._micro_batches = [_MicroBatch(i, body, self._handed_back) for i, body in enumerate(bodies)]
        self._ready = deque(self._micro_batches)
        for task in self._micro_batches:
            task.thread.start()
        running = len(self._micro_batches)
        while running:
            if self._ready:
                task = self._ready.popleft()
                computing = time.perf_counter()
                task.resume.set()
                self._handed_back.wait()
                self._handed_back.clear()
                self.stats.compute_s += time.perf_counter() - computing
                if task.error is not None:
                    raise task.error
                if task.done:
                    running -= 1
                    task.thread.join()
                receiving = time.perf_counter()
                self._take_arrived(block=False)
                self.stats.receive_s += time.perf_counter() - receiving
            else:
                waited = time.perf_counter()
                self._take_arrived(block=True)
                self.stats.expert_wait_s += time.perf_counter() - waited

    @torch.inference_mode()
    def _take_arrived(self, block: bool) -> None:
        """Handle every Combine that has arrived; with ``block``, wait for at least one.

        Inference mode: the outputs buffers were made in the micro-batch threads' inference mode."""
        while True:
            message = self.inbox.receive() if block else self.inbox.poll()
            if message is None:
                return
            block = False
            assert isinstance(message, Combine), f"attention worker got {message!r} while running"
            task = self._micro_batches[message.micro_batch]
            pending = task.pending
            assert pending is not None and pending.layer == message.layer, "combine for a call not in flight"
            worker = message.sender - 1
            pending.outputs[pending.offsets[worker] : pending.offsets[worker + 1]] = message.outputs
            pending.remaining -= 1
            if pending.remaining == 0:
                self._ready.append(task)

    def stop(self) -> None:
        """End the phase: every expert worker drains, answers Stopped, and all sends complete."""
        for rank in range(1, self.world_size):
            self.outbox.send_final(Shutdown(), rank)
        for _ in range(1, self.world_size):
            message = self.inbox.receive()
            assert isinstance(message, Stopped), f"expected Stopped, got {message!r}"
        self.outbox.flush()


# --------------------------------------------------------------------------------------------
# expert side


@dataclass
class _Queued:
    micro_batch: int
    rows: torch.Tensor  # [n, D]
    expert_ids: torch.Tensor  # [n]
    arrived: float


@dataclass
class MuQueues:
    """Per-layer queues of one expert worker and the hold rule; pure bookkeeping, no torch compute."""

    num_layers: int
    top_k: int
    hold_rows: np.ndarray
    """float64 [L] rows a layer needs before it may run without waiting for the flush."""
    flush_after_s: float
    queues: list[list[_Queued]] = field(default_factory=list)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    history: deque[np.ndarray] = field(default_factory=lambda: deque(maxlen=DEFRAG_HISTORY))

    def __post_init__(self) -> None:
        self.queues = [[] for _ in range(self.num_layers)]
        self.rows = np.zeros(self.num_layers)

    def push(self, layer: int, entry: _Queued) -> None:
        self.queues[layer].append(entry)
        self.rows[layer] += entry.rows.shape[0]

    def empty(self) -> bool:
        return not self.rows.any()

    def oldest(self) -> np.ndarray:
        """float64 [L] arrival time of each queue's oldest entry (inf when empty)."""
        return np.array([queue[0].arrived if queue else np.inf for queue in self.queues])

    def eligible(self, now: float) -> np.ndarray:
        """bool [L] layers that may run now."""
        return (self.rows > 0) & ((self.rows >= self.hold_rows) | (self.oldest() + self.flush_after_s <= now))

    def snapshot(self, eligible: np.ndarray) -> QueueSnapshot:
        tokens = self.rows / self.top_k  # [L]
        history = np.array(self.history).reshape(-1, self.num_layers)  # [H, L]
        return QueueSnapshot(tokens=tokens, history=history, eligible=eligible)

    def take(self, layer: int) -> list[_Queued]:
        self.history.append(self.rows / self.top_k)
        entries, self.queues[layer] = self.queues[layer], []
        self.rows[layer] = 0
        return entries


def serve_async(
    shard: ExpertShard,
    rank: int,
    top_k: int,
    scheduler: str,
    hold_tokens_per_expert: float,
    flush_after_s: float,
    doorbell: Doorbell,
    capacity: int,
    depth: int,
    timeout_s: float,
    stats: ExpertStats,
    failure: FailurePoint,
) -> None:
    """Expert-worker loop of the async mode: serve Dispatch messages until Shutdown, then answer Stopped.

    ``capacity`` and ``depth`` size the receives posted ahead (see :class:`~moeserve.ep.serialize.Inbox`);
    the attention worker must use the same."""
    choose = LAYER_SCHEDULERS.get(scheduler)
    inbox = InboxSet(doorbell, [0], capacity, depth, timeout_s)
    outbox = Outbox(rank=rank, depth=depth, doorbell=doorbell)
    queues = MuQueues(
        num_layers=len(shard.layers),
        top_k=top_k,
        hold_rows=np.array(shard.held_counts(), dtype=np.float64) * hold_tokens_per_expert,
        flush_after_s=flush_after_s,
    )
    stopping = False
    started, cpu_started = time.perf_counter(), time.process_time()
    while True:
        # Take everything that has arrived; block only when there is nothing to run.
        while not stopping and (inbox.ready() or queues.empty()):
            waited = time.perf_counter()
            message = inbox.receive()
            stats.idle_s += time.perf_counter() - waited
            if isinstance(message, Shutdown):
                stopping = True
            else:
                assert isinstance(message, Dispatch), f"expert worker got {message!r}"
                queues.push(
                    message.layer,
                    _Queued(message.micro_batch, message.rows, message.expert_ids, time.perf_counter()),
                )
        if queues.empty():
            break  # only after Shutdown: all work is done
        now = time.perf_counter()
        eligible = queues.eligible(now)
        if not eligible.any() and not stopping:
            # Held below the threshold: wait for more rows or the flush deadline, whichever first.
            deadline = float(queues.oldest().min()) + flush_after_s
            waited = time.perf_counter()
            inbox.ready_within(deadline - time.perf_counter())
            stats.idle_s += time.perf_counter() - waited
            continue
        if not eligible.any():
            eligible = queues.rows > 0
        snapshot = queues.snapshot(eligible)
        layer = choose(snapshot)
        if not eligible[layer]:
            raise RuntimeError(f"layer scheduler {scheduler!r} chose layer {layer}, which may not run")
        stats.queue_tokens.append(float(snapshot.tokens.sum()))
        layer_stats = stats.layers[layer]
        layer_stats.queue_rows.append(int(queues.rows[layer]))
        entries = queues.take(layer)
        layer_stats.queue_age_s.append(now - entries[0].arrived)
        failure.tick()
        computing = time.perf_counter()
        rows = torch.cat([entry.rows for entry in entries])  # [n, D]
        outputs = shard.run(layer, rows, torch.cat([entry.expert_ids for entry in entries]))  # [n, D]
        layer_stats.busy_s += time.perf_counter() - computing
        layer_stats.calls += 1
        layer_stats.rows += rows.shape[0]
        start = 0
        for entry in entries:
            end = start + entry.rows.shape[0]
            outbox.send(Combine(entry.micro_batch, layer, rank, outputs[start:end]), 0)
            start = end
    outbox.send_final(Stopped(sender=rank), 0)
    outbox.flush()
    stats.wall_s += time.perf_counter() - started
    stats.cpu_s += time.process_time() - cpu_started
