"""A real loraplex server on a free loopback port, on the demo model, with test adapters."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from peft import LoraConfig

from loraplex import LLM
from loraplex.config import EngineConfig, ServerConfig
from loraplex.lora.adapter import LAYER_TARGETS
from loraplex.server.app import build_state, create_app
from loraplex.server.state import ServerState
from tests.lora.peft_fixtures import DEMO_STRENGTH, make_adapter

ALL_SEVEN = list(LAYER_TARGETS)


@dataclass
class RunningServer:
    url: str
    state: ServerState
    adapters: dict[str, Path]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """uvicorn serving `app` on its own thread (no signal handlers there), stopped by `stop()`."""

    def __init__(self, app: object) -> None:
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="session")
def demo_adapters(tmp_path_factory: pytest.TempPathFactory, demo_model_path: Path) -> dict[str, Path]:
    """Two random PEFT adapters for the demo model under one adapter root: q/v rank 8, and all seven rank 16."""
    root = tmp_path_factory.mktemp("adapter-root")
    return {
        "qv8": make_adapter(demo_model_path, root / "qv8", LoraConfig(r=8, lora_alpha=16,
                            target_modules=["q_proj", "v_proj"]), seed=1, **DEMO_STRENGTH),
        "all16": make_adapter(demo_model_path, root / "all16", LoraConfig(r=16, lora_alpha=32,
                              target_modules=ALL_SEVEN), seed=2, **DEMO_STRENGTH),
    }


def start_server(adapters: dict[str, Path], server_config: ServerConfig | None = None,
                 **engine_options: object) -> tuple[ServerThread, RunningServer]:
    roots = tuple(sorted({str(p.parent) for p in adapters.values()}))
    options = {"max_loras": 4, "max_lora_rank": 16, "adapter_roots": roots, **engine_options}
    state = build_state(EngineConfig.from_options(**options), server_config or ServerConfig())
    thread = ServerThread(create_app(state))
    return thread, RunningServer(thread.start(), state, adapters)


@pytest.fixture(scope="session")
def offline(demo_model_path: Path) -> LLM:
    """The offline engine on the same model and adapter settings as the server, to compare against."""
    return LLM(str(demo_model_path), max_loras=4, max_lora_rank=16)


@pytest.fixture(scope="session")
def server(demo_adapters: dict[str, Path]) -> Iterator[RunningServer]:
    """One server shared by the API tests (they must leave it idle: nothing in flight when they end)."""
    thread, running = start_server(demo_adapters, ServerConfig(max_best_of=3))
    try:
        yield running
    finally:
        thread.stop()
