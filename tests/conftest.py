"""Shared fixtures: tiny random checkpoints per family, the shared/ data folder, a live server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (traces, corpora); tests needing it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists in the project's CI, not in a user's clone)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-initialised checkpoint folder per supported family."""
    from moeserve.models.random_init import SUPPORTED_TINY_FAMILIES, save_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: save_random_checkpoint(family, root / family) for family in SUPPORTED_TINY_FAMILIES}


@pytest.fixture(scope="session")
def reference_model():
    """The embedded reference model, loaded once through moeserve (fp32, dropless, auto backend)."""
    from moeserve.models.loader import load_model

    return load_model()


# -- a live moeserve server on loopback (uvicorn in a thread), over its own copy of the reference model


@contextmanager
def live_server(model, engine_config, drain_timeout_s: float = 30.0, **server_options) -> Iterator[tuple[str, object]]:
    """Start a server for ``model``; yields (base URL, Server); shuts it down (drained) on exit.

    ``server_options`` go to ``build_server`` (``cache=``, ``committee=`` for their metrics).
    """
    import uvicorn

    from moeserve.ports import free_port
    from moeserve.server.serve import build_server

    server = build_server(model, engine_config, drain_timeout_s=drain_timeout_s, **server_options)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning",
                                       timeout_graceful_shutdown=int(drain_timeout_s) + 5))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
        server.close()  # detach the load counter so the model can be reused


@pytest.fixture(scope="module")
def server_model():
    from moeserve.models.loader import load_model

    return load_model()


@pytest.fixture(scope="module")
def server_url(server_model) -> Iterator[str]:
    from moeserve.engine.engine import EngineConfig
    from moeserve.engine.scheduler import SchedulerConfig

    config = EngineConfig(SchedulerConfig(max_running=8, max_waiting=64), max_context=512)
    with live_server(server_model, config) as (url, _):
        yield url


@pytest.fixture(scope="module")
def start_server():
    """``start_server(model, engine_config)``: the :func:`live_server` context manager, for tests that need their own."""
    return live_server
