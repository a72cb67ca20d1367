"""`loraplex serve`: load the model, start the engine loop, serve HTTP until SIGTERM, then drain."""

from __future__ import annotations

import logging

import uvicorn

from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.app import build_state, create_app

log = logging.getLogger(__name__)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    state = build_state(engine_config, server_config)
    app = create_app(state)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests (streams
    # included) finish for at most timeout_graceful_shutdown seconds, then runs the app's shutdown.
    config = uvicorn.Config(app, host=server_config.hostname, port=server_config.port, log_level="info",
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout_s))
    log.info("serving %s on http://%s:%d", state.model_id, server_config.hostname, server_config.port)
    uvicorn.Server(config).run()
    return 0
