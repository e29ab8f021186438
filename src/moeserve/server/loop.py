"""Runs the engine on its own thread and hands each request's outputs to its asyncio queue.

The HTTP handlers live on the event loop; model steps run on the engine thread (torch releases
the GIL in its kernels, so the event loop keeps answering while a step computes). Every
submitted request gets exactly one stream of outputs ending in a finished output — normal
finish, abort (client gone, shutdown) or a failed model step — so no handler waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from moeserve.engine.engine import Engine, RequestOutput
from moeserve.engine.request import SamplingParams, new_request_id
from moeserve.server.metrics import ServerMetrics

log = logging.getLogger("moeserve.server")


class EngineLoop:
    """Owns the engine thread. ``submit`` / ``abort`` are called from the event loop."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None, warm_up: bool = False,
                 on_ready: Callable[[], None] | None = None) -> None:
        """``warm_up``: run :meth:`Engine.warm_up` on the engine thread before serving (on that
        thread, so its allocator arena is the one that keeps the temporaries); ``on_ready`` runs
        after it, before the first request (e.g. attaching routing counters)."""
        self.engine = engine
        self.metrics = metrics
        self._warm_up = warm_up
        self._on_ready = on_ready
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.accepting = True
        self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread; returns once it is ready for requests (after the warm-up)."""
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise RuntimeError(f"engine warm-up failed: {self._start_error}") from self._start_error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its outputs arrive on.

        Raises QueueFullError, ContextLengthError (from the engine) and RuntimeError when shutting down.
        """
        if not self.accepting:
            raise RuntimeError("the server is shutting down")
        request_id = new_request_id("cmpl")
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(prompt_ids, sampling, request_id)
        except BaseException:
            with self._streams_lock:
                del self._streams[request_id]
            raise
        self._wake.set()
        return request_id, queue

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their queues with one wake-up of each event loop, not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._streams_lock:
            for output in outputs:
                if output.finished:
                    target = self._streams.pop(output.request_id, None)
                else:
                    target = self._streams.get(output.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # the event loop is closed: nobody is waiting any more

    def _run(self) -> None:
        try:
            if self._warm_up:
                self.engine.warm_up()
            if self._on_ready is not None:
                self._on_ready()
        except BaseException as error:  # start() re-raises it on the starting thread
            log.exception("engine warm-up failed")
            self._start_error = error
            self._ready.set()
            return
        self._ready.set()
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a bug outside the model forward: no handler may wait forever
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {type(error).__name__}: {error}")
                time.sleep(0.1)  # a persistent failure must not spin
                continue
            if self.metrics is not None:
                for output in outputs:
                    self.metrics.observe(output)
            self._deliver(outputs)

    def _fail_all(self, message: str) -> None:
        """End every open stream with an error output and abort its request in the engine."""
        with self._streams_lock:
            request_ids = list(self._streams)
        now = time.monotonic()
        failed = []
        for request_id in request_ids:
            self.engine.abort(request_id)
            failed.append(RequestOutput(request_id=request_id, text="", token_ids=[], finished=True, finish_reason="error",
                                        prompt_tokens=0, completion_tokens=0, arrival_time=now, first_token_time=None,
                                        now=now, error=message))
        self._deliver(failed)

    def drain(self, timeout_s: float) -> int:
        """Stop accepting, let running and waiting requests finish; abort what is left after ``timeout_s``.

        Returns how many requests had to be aborted.
        """
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while self.engine.has_work() and time.monotonic() < deadline and self.alive:
            time.sleep(0.02)
        with self._streams_lock:
            left = list(self._streams)
        for request_id in left:
            self.abort(request_id)
        while self.engine.has_work() and self.alive and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        return len(left)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
