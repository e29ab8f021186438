"""Wire a loaded model into a server: engine, metrics, engine loop, FastAPI app; run it with uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from moeserve.engine.engine import EngineConfig, build_engine
from moeserve.models.loader import MoEModel
from moeserve.server.app import ServerConfig, create_app
from moeserve.server.loop import EngineLoop
from moeserve.server.metrics import ExpertLoadCounter, MoECollector, ServerMetrics

if TYPE_CHECKING:
    from moeserve.ep.serving import ExpertParallelService


@dataclass
class Server:
    """The parts of one server; ``app`` is what uvicorn (or a test client) runs."""

    app: FastAPI
    loop: EngineLoop
    metrics: ServerMetrics
    config: ServerConfig
    loads: ExpertLoadCounter | None = None

    def close(self) -> None:
        """Detach the server's routing observer from the model (after the app has shut down)."""
        if self.loads is not None:
            self.loads.detach()


def build_server(
    model: MoEModel,
    engine_config: EngineConfig | None = None,
    model_name: str | None = None,
    cache: Any = None,
    committee: Any = None,
    default_max_tokens_chat: int = 256,
    drain_timeout_s: float = 30.0,
    expert_parallel: ExpertParallelService | None = None,
    warm_up: bool = False,
) -> Server:
    """A server for ``model`` (with its expert cache / committee / expert parallelism, if applied, for their metrics).

    With ``expert_parallel`` the routed experts run in worker processes: per-expert loads are not
    counted here (the MoE layers are bypassed); rows per worker and the wait on experts are.
    ``warm_up`` runs :meth:`Engine.warm_up` (the largest steps, on dummy tokens) when the app
    starts, on the engine thread and before the routing counter is attached, so memory is at its
    high-water mark before the first request and the counts hold only served tokens.
    """
    engine = build_engine(model, engine_config)
    loads = ExpertLoadCounter(model, attach=False) if expert_parallel is None else None
    metrics = ServerMetrics(
        running=lambda: engine.num_running,
        waiting=lambda: engine.num_waiting,
        moe=MoECollector(loads, cache, committee, expert_parallel.stats if expert_parallel is not None else None),
    )
    loop = EngineLoop(engine, metrics, warm_up=warm_up, on_ready=loads.attach if loads is not None else None)
    config = ServerConfig(
        model_name=model_name or model.name,
        max_context=engine.max_context,
        vocab_size=int(model.config.vocab_size),
        default_max_tokens_chat=default_max_tokens_chat,
        drain_timeout_s=drain_timeout_s,
    )
    health = [expert_parallel.alive] if expert_parallel is not None else []
    shutdown: list[Callable[[], None]] = [expert_parallel.stop] if expert_parallel is not None else []
    app = create_app(loop, model.tokenizer, config, metrics, health_checks=health, on_shutdown=shutdown)
    return Server(app, loop, metrics, config, loads)


def run_server(server: Server, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; running requests drain before the process exits."""
    import uvicorn

    uvicorn.run(
        server.app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(server.config.drain_timeout_s) + 5,
    )
