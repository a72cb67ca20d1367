"""`loraplex serve`: load the model, start the engine loop, serve HTTP until SIGTERM, then drain."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from loraplex.config import EngineConfig, ServerConfig
from loraplex.runtime import use_one_torch_thread
from loraplex.server.app import build_state, create_app
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    use_one_torch_thread()  # this thread runs the event loop; the model runs on the engine's thread
    state = build_state(engine_config, server_config)
    app = create_app(state)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests (streams
    # included) finish for at most timeout_graceful_shutdown seconds, then runs the app's shutdown.
    config = uvicorn.Config(app, host=server_config.hostname, port=server_config.port, log_level="info",
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout_s))
    log.info("serving %s on http://%s:%d", state.model_id, server_config.hostname, server_config.port)
    _DrainingServer(config, state).run()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with /ready answering 503 from the moment a shutdown signal arrives (uvicorn
    runs the app's own shutdown only after the in-flight requests have drained)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)
