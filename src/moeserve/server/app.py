"""The OpenAI-compatible HTTP server: FastAPI routes over an :class:`EngineLoop`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with SSE),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. Every refusal is a 4xx with an OpenAI
error body; a full waiting queue is a 429 with ``Retry-After``. A client that disconnects
aborts its request (its slot is freed at the next engine step). On shutdown, uvicorn stops
accepting connections and waits for open ones; then the lifespan drains the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from moeserve.engine.engine import ContextLengthError, RequestOutput
from moeserve.engine.scheduler import QueueFullError
from moeserve.errors import MoeserveError
from moeserve.server.loop import EngineLoop
from moeserve.server.metrics import ServerMetrics
from moeserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body

_FALLBACK_CHAT_TEMPLATE = "{role}: {content}\n"
"""Used when the tokenizer has no chat template (the reference model is trained on source code)."""


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs to know beyond the engine."""

    model_name: str
    """The name clients put in ``model``; any other name is a 404."""
    max_context: int
    vocab_size: int
    default_max_tokens_chat: int = 256
    """Chat requests without max_tokens get min(this, what fits in the context)."""
    drain_timeout_s: float = 30.0
    """On shutdown, how long running requests may take before they are aborted."""
    retry_after_s: int = 1
    max_body_bytes: int = 4 * 2**20
    """Larger request bodies are refused (413) before they are parsed or tokenized."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if self.default_max_tokens_chat < 1:
            raise ValueError(f"default_max_tokens_chat must be >= 1, got {self.default_max_tokens_chat}")


class ClientGoneError(Exception):
    """The client disconnected while its request was running."""


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], encode: Any) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template, or ``role: content`` lines without one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return encode("".join(_FALLBACK_CHAT_TEMPLATE.format(**m) for m in messages) + "assistant:")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def merge_pending_outputs(output: RequestOutput, queue: asyncio.Queue) -> tuple[RequestOutput, RequestOutput | None]:
    """``output`` merged with the outputs already waiting in ``queue``: (one event's output, carry).

    Deltas a stream has not sent yet go out as one event, so a lagging client or event loop
    catches up instead of falling further behind: texts and token ids are concatenated in order
    and the last merged output's other fields (finished, finish reason, counts) are kept. Merging
    stops at a finished output, or before an error or abort, which is returned as ``carry`` to
    be sent after the text before it. Only takes what is already queued; never waits.
    """
    while not output.finished and not queue.empty():
        following: RequestOutput = queue.get_nowait()
        if following.finish_reason in ("error", "abort"):
            return output, following
        output = replace(following, text=output.text + following.text,
                         token_ids=output.token_ids + following.token_ids)
    return output, None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage(output: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


def create_app(
    engine_loop: EngineLoop,
    tokenizer: Any,
    config: ServerConfig,
    metrics: ServerMetrics,
    health_checks: list[Callable[[], bool]] | None = None,
    on_shutdown: list[Callable[[], None]] | None = None,
) -> FastAPI:
    """The FastAPI application; the engine loop starts with the app and drains on shutdown.

    ``health_checks`` must all hold for ``/health`` to be green (e.g. expert workers alive);
    ``on_shutdown`` runs after the engine has drained and stopped (e.g. stop expert workers).
    """
    checks = list(health_checks or [])

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not engine_loop.alive:
            engine_loop.start()
        yield
        await asyncio.to_thread(engine_loop.drain, config.drain_timeout_s)
        engine_loop.stop()
        for action in on_shutdown or []:
            await asyncio.to_thread(action)

    app = FastAPI(title="moeserve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        metrics.rejected.labels(status=str(error.status)).inc()
        return _error_response(error)

    @app.exception_handler(404)
    async def _not_found(request: Request, _error: Exception) -> JSONResponse:
        return _error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, _error: Exception) -> JSONResponse:
        return _error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}"))

    @app.get("/health")
    async def health() -> Response:
        if engine_loop.alive and engine_loop.accepting and all(check() for check in checks):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "moeserve",
                      "max_model_len": config.max_context}],
        }

    async def _read_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise APIError(413, f"the request body has {len(raw)} bytes; at most {config.max_body_bytes} are accepted")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None

    def _check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{config.model_name}`",
                           param="model", code="model_not_found")

    def _encode(text: str) -> list[int]:
        ids = tokenizer(text)["input_ids"]
        if not ids:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = [start]
        return list(ids)

    def _prompt_ids(body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, str):
            return _encode(prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt[0], str):
            return _encode(str(prompt[0]))
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise APIError(400, f"token ids out of range [0, {config.vocab_size}): {bad[:5]}", param="prompt")
        return ids

    def _chat_ids(body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return chat_prompt_ids(tokenizer, messages, _encode)

    def _max_tokens(requested: int | None, prompt_len: int, default: int) -> int:
        if requested is None:
            return max(1, min(default, config.max_context - prompt_len))
        if requested < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        return requested

    def _submit(prompt_ids: list[int], body: Any, max_tokens: int) -> tuple[str, asyncio.Queue]:
        try:
            sampling = body.sampling(max_tokens)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        try:
            return engine_loop.submit(prompt_ids, sampling)
        except ContextLengthError as error:
            raise APIError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
        except QueueFullError as error:
            raise APIError(429, f"{error}; retry later", code="queue_full", error_type="rate_limit_error",
                           headers={"Retry-After": str(config.retry_after_s)}) from None
        except RuntimeError as error:  # shutting down
            raise APIError(503, str(error), code="unavailable", error_type="server_error") from None
        except MoeserveError as error:
            raise APIError(400, str(error)) from None

    async def _collect(request: Request, request_id: str, queue: asyncio.Queue) -> tuple[str, RequestOutput]:
        """All of a request's text; aborts the request and raises ClientGoneError if the client left.

        Outputs arrive every step, so the disconnect check runs on a clock (every 0.5 s), not
        only when the queue is quiet.
        """
        parts = []
        next_check = time.monotonic() + 0.5
        getter = asyncio.ensure_future(queue.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if done:
                output: RequestOutput = getter.result()
                parts.append(output.text)
                if output.finished:
                    _check_ended(output)
                    return "".join(parts), output
                getter = asyncio.ensure_future(queue.get())
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                if await request.is_disconnected():
                    getter.cancel()
                    engine_loop.abort(request_id)
                    raise ClientGoneError(request_id)

    def _check_ended(output: RequestOutput) -> None:
        if output.finish_reason == "error":
            raise APIError(500, output.error or "the model step failed", code="engine_error", error_type="server_error")
        if output.finish_reason == "abort":
            raise APIError(503, "the request was cancelled: the server is shutting down", code="unavailable",
                           error_type="server_error")

    async def _respond(request: Request, request_id: str, queue: asyncio.Queue,
                       body_of: Callable[[str, str | None], dict]) -> Response:
        """The whole (non-streamed) answer: ``body_of(text, finish_reason)`` plus usage; 499 if the client left."""
        try:
            text, output = await _collect(request, request_id, queue)
        except ClientGoneError:
            return Response(status_code=499)
        return JSONResponse({**body_of(text, output.finish_reason), "usage": _usage(output)})

    def _stream(request_id: str, queue: asyncio.Queue, chunk, include_usage: bool, first: dict | None) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                if first is not None:
                    yield _sse(first)
                carry: RequestOutput | None = None
                while True:
                    output: RequestOutput = carry if carry is not None else await queue.get()
                    output, carry = merge_pending_outputs(output, queue)
                    finished = output.finished
                    if output.finish_reason in ("error", "abort"):
                        error = APIError(500 if output.finish_reason == "error" else 503,
                                         output.error or "the request was cancelled: the server is shutting down",
                                         error_type="server_error")
                        yield _sse(error.body())
                        break
                    if output.text or output.finished:
                        yield _sse(chunk(output.text, output.finish_reason if output.finished else None))
                    if output.finished:
                        if include_usage:
                            usage = chunk("", None)
                            usage["choices"] = []
                            usage["usage"] = _usage(output)
                            yield _sse(usage)
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away (the task was cancelled) or we broke off
                    engine_loop.abort(request_id)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse_body(CompletionRequest, await _read_json(request))
        _check_model(body.model)
        body.check_supported()
        prompt_ids = _prompt_ids(body)
        max_tokens = _max_tokens(body.max_tokens, len(prompt_ids), 16)
        request_id, queue = _submit(prompt_ids, body, max_tokens)
        created = int(time.time())
        base = {"id": request_id, "object": "text_completion", "created": created, "model": config.model_name}
        if body.stream:
            def chunk(text: str, finish_reason: str | None) -> dict:
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

            return _stream(request_id, queue, chunk, _include_usage(body), None)
        return await _respond(request, request_id, queue, lambda text, reason: {
            **base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = parse_body(ChatCompletionRequest, await _read_json(request))
        _check_model(body.model)
        body.check_supported()
        prompt_ids = _chat_ids(body)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = _max_tokens(requested, len(prompt_ids), config.default_max_tokens_chat)
        request_id, queue = _submit(prompt_ids, body, max_tokens)
        chat_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        base = {"id": chat_id, "created": int(time.time()), "model": config.model_name}
        if body.stream:
            def chunk(text: str, finish_reason: str | None) -> dict:
                delta = {"content": text} if text or finish_reason is None else {}
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

            first = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            return _stream(request_id, queue, chunk, _include_usage(body), first)
        return await _respond(request, request_id, queue, lambda text, reason: {
            **base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}]})

    return app
