"""The continuous-batching engine: ``step()`` = schedule -> execute -> postprocess.

Thread contract: ``add_request`` and ``abort`` may be called from any thread; ``step`` runs on
one thread (the server's engine thread). The lock guards the scheduler's queues, never the
model forward, so requests keep arriving while a step computes.

The engine knows nothing about HTTP or metrics backends: each step returns
:class:`RequestOutput` deltas (new text, new token ids, timings) that the caller routes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Protocol

from moeserve.engine.request import Request, RequestStatus, SamplingParams, new_request_id
from moeserve.engine.scheduler import Batch, Scheduler, SchedulerConfig, SlotMove
from moeserve.errors import MoeserveError

log = logging.getLogger("moeserve.engine")

class ContextLengthError(MoeserveError):
    """Prompt plus max_tokens does not fit the model's context."""


DEFAULT_MAX_CONTEXT = 4096


class Runner(Protocol):
    """What the engine needs from a model runner (the real one, or a fake in scheduler tests)."""

    def execute(self, batch: Batch) -> list[int]: ...

    def move_slot(self, move: SlotMove) -> None: ...

    def release(self, request: Request) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and limits of one engine."""

    scheduler: SchedulerConfig = SchedulerConfig()
    max_context: int | None = None
    """Prompt + generated tokens per request (the KV slot size). None: the model's context,
    at most ``DEFAULT_MAX_CONTEXT`` (every slot preallocates this many positions)."""

    def __post_init__(self) -> None:
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text: str
    """Text that became final this step (stop strings removed; may be empty)."""
    token_ids: list[int]
    """Token ids generated this step."""
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far (all of them once finished)."""
    arrival_time: float
    first_token_time: float | None
    now: float
    error: str | None = None
    """Why the request ended with finish_reason ``error``."""


class Detokenizer:
    """Incremental text of one request, holding back what could still become a stop string.

    Each step decodes only a short window: the tokens since the last emitted text plus the
    token before them as context (``prefix_offset..read_offset``), the way vLLM's incremental
    detokenizer does, instead of the whole output, whose decode grows with every token.
    :func:`decode_full` is the plain reference (the whole output at once); a test checks the
    two give the same text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        """Text of ``token_ids[:read_offset]``."""
        self.prefix_offset = 0
        self.read_offset = 0
        self.sent = 0
        self.stopped = False

    def _advance(self, token_ids: list[int], final: bool) -> None:
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        window = decode(token_ids[self.prefix_offset :], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return  # a multi-byte character is still incomplete
        if len(window) > len(prefix):
            self.text += window[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)

    def push(self, token_ids: list[int], final: bool) -> str:
        """New final text after the tokens so far; sets ``stopped`` when a stop string appeared."""
        self._advance(token_ids, final)
        text = self.text
        cut = min((i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self.hold
        if end <= self.sent:
            return ""
        piece = text[self.sent : end]
        self.sent = end
        return piece


def decode_full(tokenizer, token_ids: list[int]) -> str:
    """Reference for :class:`Detokenizer`: the whole output decoded at once."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)


class Engine:
    """Continuous batching over one model runner."""

    def __init__(self, runner: Runner, tokenizer, config: EngineConfig, eos_token_id: int | None) -> None:
        if config.max_context is None:
            raise ValueError("resolve EngineConfig.max_context before building an Engine (build_engine does)")
        self.max_context: int = config.max_context
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_id = eos_token_id
        self.scheduler = Scheduler(config.scheduler)
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}
        self.steps = 0

    # -- any thread ---------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None) -> Request:
        """Queue a request. Raises ContextLengthError, QueueFullError (retry later)."""
        if not prompt_ids:
            raise MoeserveError("the prompt has no tokens")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens, but "
                f"{total} were requested ({len(prompt_ids)} in the prompt, {sampling.max_tokens} for the completion)"
            )
        request = Request(request_id or new_request_id(), list(prompt_ids), sampling)
        with self._lock:
            if request.request_id in self._requests:
                raise MoeserveError(f"request id {request.request_id!r} is already in use")
            self.scheduler.add(request)
            self._requests[request.request_id] = request
            self._detokenizers[request.request_id] = Detokenizer(self.tokenizer, sampling.stop)
        return request

    def abort(self, request_id: str) -> None:
        """Cancel a request; it finishes with reason ``abort`` at the next step (no-op if unknown)."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None:
                request.abort_requested = True

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    # -- engine thread ------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run the largest steps the scheduler can produce once, on dummy tokens, before serving.

        A server's memory should not climb under its first heavy load: the allocator keeps the
        largest step's temporaries (padded prefill activations, attention masks, expert rows)
        once they have been needed. Like vLLM's profiling run at start-up, this reaches that
        high-water mark at once: a prefill of the longest prompt a request may have, a prefill
        filling the token budget across every slot, and a decode of every slot over the whole
        context. Nothing is queued or kept; the KV slots are free again afterwards (later
        prefills overwrite them and masks hide the rest).
        """
        if self.has_work():
            raise MoeserveError("warm_up runs before the engine takes requests")
        slots = self.config.scheduler.max_running
        longest = self.max_context - 1
        per_slot = max(1, min(longest, self.config.scheduler.max_prefill_tokens // slots))
        sampling = SamplingParams(max_tokens=1)
        dummy = (self.eos_token_id or 0) + 1

        def requests(rows: int, length: int) -> list[Request]:
            return [Request(f"warm-up-{row}", [dummy] * length, sampling) for row in range(rows)]

        self.runner.execute(Batch("prefill", requests(1, longest), 0))
        self.runner.execute(Batch("prefill", requests(slots, per_slot), 0))
        full = requests(slots, longest)
        for request in full:
            request.output_ids.append(dummy)  # decode at the last position of the context
        self.runner.execute(Batch("decode", full, 0))
        for request in full:
            self.runner.release(request)

    def step(self) -> list[RequestOutput]:
        """One model step: schedule -> execute -> postprocess. Returns this step's outputs."""
        with self._lock:
            outputs = self._reap_aborted()
            batch = self.scheduler.schedule()
        if batch is None:
            return outputs
        try:
            token_ids = self.runner.execute(batch)
        except Exception as error:  # one failed forward ends its batch's requests, not the engine
            log.exception("model step failed")
            message = f"model step failed: {type(error).__name__}: {error}"
            with self._lock:
                outputs.extend(self._finish(r, "error", "", [], message) for r in batch.requests)
            return outputs
        self.steps += 1
        with self._lock:
            outputs.extend(self._postprocess(batch, token_ids))
        return outputs

    def _reap_aborted(self) -> list[RequestOutput]:
        outputs = []
        for request in [r for r in self._requests.values() if r.abort_requested]:
            if request.status is RequestStatus.WAITING:
                self.scheduler.remove_waiting(request)
                outputs.append(self._finish(request, "abort", "", []))
            elif request.status is RequestStatus.RUNNING:
                outputs.append(self._finish(request, "abort", "", []))
        return outputs

    def _postprocess(self, batch: Batch, token_ids: list[int]) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for request, token in zip(batch.requests, token_ids, strict=True):
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            sampling = request.sampling
            if token == self.eos_token_id and not sampling.ignore_eos:
                text = self._detokenizers[request.request_id].push(request.output_ids, final=True)
                outputs.append(self._finish(request, "stop", text, []))
                continue
            request.output_ids.append(token)
            length_done = len(request.output_ids) >= sampling.max_tokens
            detokenizer = self._detokenizers[request.request_id]
            text = detokenizer.push(request.output_ids, final=length_done)
            if detokenizer.stopped:
                outputs.append(self._finish(request, "stop", text, [token]))
            elif length_done:
                outputs.append(self._finish(request, "length", text, [token]))
            else:
                outputs.append(self._output(request, text, [token], now))
        return outputs

    def _finish(self, request: Request, reason: str, text: str, token_ids: list[int], error: str | None = None) -> RequestOutput:
        if request.status is RequestStatus.RUNNING:
            move = self.scheduler.finish(request)
            if move is not None:
                self.runner.move_slot(move)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.runner.release(request)
        del self._requests[request.request_id]
        del self._detokenizers[request.request_id]
        return self._output(request, text, token_ids, time.monotonic(), error)

    @staticmethod
    def _output(request: Request, text: str, token_ids: list[int], now: float, error: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            token_ids=token_ids,
            finished=request.finished,
            finish_reason=request.finish_reason,
            prompt_tokens=request.num_prompt_tokens,
            completion_tokens=len(request.output_ids),
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            now=now,
            error=error,
        )


def build_engine(model, config: EngineConfig | None = None) -> Engine:
    """An engine over a loaded :class:`~moeserve.models.loader.MoEModel` (imports torch)."""
    from moeserve.engine.runner import ModelRunner

    if model.tokenizer is None:
        raise MoeserveError(f"{model.path} has no tokenizer files (tokenizer.json); cannot serve text")
    model_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    config = config or EngineConfig()
    if config.max_context is None:
        config = replace(config, max_context=min(model_context or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT))
    assert config.max_context is not None
    if model_context and config.max_context > model_context:
        raise MoeserveError(f"max_context {config.max_context} exceeds the model's context of {model_context} tokens")
    runner = ModelRunner(model, config.scheduler.max_running, config.max_context)
    return Engine(runner, model.tokenizer, config, model.tokenizer.eos_token_id)
