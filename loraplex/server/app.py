"""The FastAPI application: routes, error handlers, engine lifecycle, health, info and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from loraplex import __version__
from loraplex.adapters.ref import parse_ref
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import AsyncEngine, EngineDead
from loraplex.engine.engine import Engine
from loraplex.engine.request import MAX_STOP_SEQUENCES
from loraplex.examples import ADAPTERS_DIR
from loraplex.lora.adapter import AdapterError
from loraplex.runtime import keep_freed_memory
from loraplex.server import admin, native, openai
from loraplex.server.errors import install_error_handlers
from loraplex.server.generation import Generation
from loraplex.server.metrics import Metrics
from loraplex.server.state import ServerState, get_state


def build_state(engine_config: EngineConfig, server_config: ServerConfig) -> ServerState:
    """Start the engine loop thread, which loads the model, and wire the facade around it.

    A server serves local adapters by name from its adapter roots only, never from any folder a request
    names; with no `--adapter-root` (the demo) the one root is the bundled examples' folder.
    """
    roots = engine_config.adapters.adapter_roots or (str(ADAPTERS_DIR),)
    for root in roots:
        if not Path(root).is_dir():
            raise ValueError(f"adapter root {root!r} is not a folder")
    config = replace(engine_config, adapters=replace(engine_config.adapters, adapter_roots=roots))
    missing = [s for s in (server_config.adapter_source, *server_config.allow_request_sources)
               if s not in config.adapters.sources]
    if missing:
        raise ValueError(f"adapter sources {missing} (adapter_source, allow_request_sources) are not among the "
                         f"engine's sources {list(config.adapters.sources)}")
    # The model is built on the engine's loop thread, the one that will run it: a thread that has run
    # torch ops keeps an OpenMP team, and two teams on a small machine slow every step. malloc is tuned
    # before that thread starts so it shares the main heap (loraplex.runtime).
    keep_freed_memory(config.model.torch_device())
    async_engine = AsyncEngine(lambda: Engine(config), server_config.max_concurrent_requests)
    async_engine.start()
    engine = async_engine.engine
    metrics = Metrics()
    metrics.watch(async_engine)
    generation = Generation(async_engine, engine.tokenizer, metrics)
    return ServerState(server_config, async_engine, generation, metrics, engine.model_name)


def preload(state: ServerState) -> None:
    """Fetch `--preloaded-adapter-ids` and put them in device slots; others still load on demand.
    Runs on the engine's loop thread."""
    engine = state.engine.engine
    if not state.config.preloaded_adapter_ids:
        return
    if engine.adapters is None or engine.lora is None:
        raise ValueError("preloaded_adapter_ids needs max_loras > 0")
    for adapter_id in state.config.preloaded_adapter_ids:
        try:  # the operator's own ids: any source the engine has, but local ones by name like a client's
            ref = parse_ref(adapter_id, None, state.config.adapter_source, local_paths=False)
            loaded = engine.adapters.request(ref).result()
        except AdapterError as e:
            raise ValueError(f"preloaded adapter {adapter_id!r} could not be loaded: {e}") from e
        engine.lora.warm(loaded.identity, loaded.weights)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.engine.call(lambda _: preload(state))  # before the first request is accepted
        try:
            yield
        finally:
            state.engine.drain()
            state.engine.stop()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan,
                  description="Multi-LoRA inference server: the LoRAX/TGI native API and the OpenAI API.")
    app.state.loraplex = state
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(admin.dynamic_lora)

    @app.get("/health", tags=["ops"])
    async def health(request: Request) -> JSONResponse:
        """Liveness: 200 while the engine loop runs, 503 once it has died."""
        engine = get_state(request).engine
        if not engine.alive:
            raise EngineDead(f"the engine loop has stopped: {engine.dead!r}")
        return JSONResponse({"status": "ok"})

    @app.get("/ready", tags=["ops"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 503 while draining for shutdown or when the engine loop has died."""
        s = get_state(request)
        if not s.engine.alive:
            raise EngineDead(f"the engine loop has stopped: {s.engine.dead!r}")
        if s.engine.draining:
            raise EngineDead("the server is shutting down")
        return JSONResponse({"status": "ready"})

    @app.get("/info", tags=["ops"])
    async def info(request: Request) -> JSONResponse:
        s = get_state(request)
        core = s.engine.engine
        cfg = core.config
        limit = s.token_limit()
        return JSONResponse({
            "model_id": s.model_id,
            "model_sha": None,
            "model_dtype": str(cfg.model.torch_dtype()).removeprefix("torch."),
            "model_device_type": cfg.model.torch_device().type,
            "linear_backend": core.linear_backend,
            "attention_backend": core.attention_backend,
            "lora_backend": core.lora.backend if core.lora is not None else None,
            "async_output": core.async_output,
            "async_scheduling": core.async_scheduling,
            "cuda_graphs": core.cuda_graphs,
            "quantize": core.quantize,
            "speculative": core.speculation_info(),
            "model_weight_bytes": core.weight_bytes,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.config.max_concurrent_requests,
            "max_best_of": s.config.max_best_of,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_length": min(limit - 1, cfg.scheduler.max_input_length or limit),
            "max_total_tokens": limit,
            "max_batch_total_tokens": core.pool.num_blocks * core.kv_cache.block_size,
            "max_active_adapters": cfg.lora.max_loras,
            "max_lora_rank": cfg.lora.max_lora_rank,
            "adapter_source": s.config.adapter_source,
            "version": __version__,
            "sha": None,
            "docker_label": None,
        })

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    return app
