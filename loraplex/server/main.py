"""`loraplex serve`: load the model, start the engine loop, serve HTTP until SIGTERM, then drain.

Shutdown, in order: the first SIGTERM (or SIGINT) starts the drain: `/ready` answers 503 and new
generation requests are refused with 503, while the listener stays open (so probes still get their
answer) and the requests in flight go on. When none is left, or `shutdown_timeout_s` has passed, the
server stops; a request still running then is cut with an error (a stream ends with an error event,
never a clean end). A second signal cuts at once. If the engine loop dies, the process exits with
status EXIT_ENGINE_DEAD so an orchestrator restarts it, rather than answering 503 for ever.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import ShuttingDown
from loraplex.runtime import use_one_torch_thread
from loraplex.server.app import build_state, create_app
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 3
"""Exit status of `loraplex serve` when the engine loop died (2 is a bad command line)."""
CUT_GRACE_S = 2.0
"""After cutting the requests left at the shutdown timeout: time for their error events to go out."""
CLOSE_GRACE_S = 5
"""uvicorn's own wait for open connections once the drain is over (it closes the listener first)."""


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    use_one_torch_thread()  # this thread runs the event loop; the model runs on the engine's thread
    state = build_state(engine_config, server_config)
    server = build_server(state)
    log.info("serving %s on http://%s:%d", state.model_id, server_config.hostname, server_config.port)
    server.run()
    if server.engine_died:
        log.critical("exiting with status %d: the engine loop died (%r)", EXIT_ENGINE_DEAD, state.engine.dead)
        return EXIT_ENGINE_DEAD
    return 0


def build_server(state: ServerState) -> DrainingServer:
    """The uvicorn server for `state`'s app, on its configured host and port."""
    config = uvicorn.Config(create_app(state), host=state.config.hostname, port=state.config.port,
                            log_level="info", timeout_graceful_shutdown=CLOSE_GRACE_S)
    return DrainingServer(config, state)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its shutdown (see the module docstring), and an exit
    when the engine loop dies. uvicorn itself would close the listener at the first signal, so a
    readiness probe would never see the 503 that takes the replica out of its load balancer."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state
        self._drain_deadline: float | None = None
        self._cut_at: float | None = None
        self.engine_died = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only sets flags, which on_tick (every 0.1 s) acts on.
        self._captured_signals.append(sig)  # uvicorn re-raises them once shut down, as it would have
        if self._drain_deadline is None:
            self.start_drain()
        else:
            self._drain_deadline = time.monotonic()  # a second signal: stop waiting

    def start_drain(self) -> None:
        self._state.engine.drain()
        self._drain_deadline = time.monotonic() + self._state.config.shutdown_timeout_s
        log.warning("draining: %d requests in flight, at most %.0f s", self._state.engine.num_in_flight,
                    self._state.config.shutdown_timeout_s)

    async def on_tick(self, counter: int) -> bool:
        engine = self._state.engine
        if not self.should_exit and engine.dead is not None:
            self.engine_died = True
            self.should_exit = True
        elif not self.should_exit and self._drain_deadline is not None:
            now = time.monotonic()
            if engine.num_in_flight == 0:
                self.should_exit = True
            elif self._cut_at is None and now >= self._drain_deadline:
                log.warning("shutdown timeout: cutting %d requests still in flight", engine.num_in_flight)
                engine.cancel_all(ShuttingDown(
                    f"the server shut down before this request finished (shutdown timeout "
                    f"{self._state.config.shutdown_timeout_s:g} s)"))
                self._cut_at = now
            elif self._cut_at is not None and now >= self._cut_at + CUT_GRACE_S:
                self.should_exit = True
        return await super().on_tick(counter)
