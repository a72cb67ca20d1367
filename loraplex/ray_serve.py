"""loraplex on Ray Serve: N engine replicas behind one ingress, requests routed by adapter.

    serve run loraplex.ray_serve:build_app num_replicas=2 max_loras=8 adapter_roots=/adapters
    loraplex ray-serve --num-replicas 2 --max-loras 8 --adapter-root /adapters     (the same, from the CLI)

Each replica (`LoraplexReplica`) is a whole loraplex server: its engine, its adapter tiers, its HTTP app
(native and OpenAI routes), driven in-process. The ingress (`LoraplexIngress`, a FastAPI app behind Ray
Serve's HTTP proxy) reads the adapter a request names (`model` on the OpenAI routes, `parameters.adapter_id`
or `adapter_id` on the native ones) and calls the replicas with it as Ray Serve's multiplexed model id.
`AdapterAffinityRouter` sends an adapter's requests to the replica its id hashes to, so they stick to
the replica whose tiers hold it warm, and spills to the next replica (in the same hash order) only when
that one is full. Requests for the base model carry no id and go to the less busy of two replicas.

A replica that dies is replaced by Ray Serve's controller; the requests it was serving get an error
(HTTP 503 with loraplex's error body, or an error event in a stream), never a silent end. Each response
names the replica that served it in the `x-loraplex-replica` header.

Autoscaling: `autoscaling_config` (Ray Serve's: min_replicas, max_replicas, target_ongoing_requests ...)
instead of `num_replicas`. Every `loraplex serve` flag is an option of `build_app` by its config field name.
"""

# No `from __future__ import annotations`: FastAPI reads the ingress method's annotations at runtime.
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from loraplex.cli import CONFIG_CLASSES
from loraplex.config import EngineConfig, ServerConfig

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")
NATIVE_PATHS = ("/", "/generate", "/generate_stream")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "host"}


def adapter_of(path: str, body: bytes, base_model: str) -> str:
    """The adapter a request names ("" for the base model or a body that names none): what the replicas
    are chosen by. A body that does not parse names none; the replica then answers its error."""
    if path not in OPENAI_PATHS and path not in NATIVE_PATHS:
        return ""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    if path in OPENAI_PATHS:
        model = data.get("model")
        return model if isinstance(model, str) and model != base_model else ""
    params = data.get("parameters")
    adapter = params.get("adapter_id") if isinstance(params, dict) else None
    adapter = adapter if adapter is not None else data.get("adapter_id")
    return adapter if isinstance(adapter, str) else ""


class AdapterAffinityRouter(FIFOMixin, RequestRouter):  # type: ignore[misc]
    """Ray Serve's request router for the replicas: an adapter's requests go to the replica its id hashes
    to (rendezvous hashing over the running replicas), then, when that one is full (max_ongoing_requests),
    to the next in the same order; base-model requests to the less busy of two random replicas.

    Ray Serve's own multiplexed routing prefers replicas that already served an adapter, but once two have
    (as with a burst of first requests) it splits the adapter's traffic between them for good; hashing
    keeps it on one, and a replica's death moves only the adapters that hashed to it."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: _affinity(adapter, r.replica_id.unique_id), reverse=True)
        return [[replica] for replica in ranked]


def _affinity(adapter: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest()


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class LoraplexReplica:
    """One loraplex server (engine, tiers, app) serving requests the ingress forwards."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig) -> None:
        from loraplex.runtime import use_one_torch_thread
        from loraplex.server.app import build_state, create_app

        use_one_torch_thread()  # this thread runs the event loop; the model runs on the engine's thread
        self.state = build_state(engine_config, server_config)
        self.app = create_app(self.state)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._preloaded: asyncio.Task[None] | None = None

    async def _ready(self) -> None:
        from loraplex.server.app import preload

        if self._preloaded is None:  # the app's lifespan would run it; this app is driven without one
            self._preloaded = asyncio.ensure_future(self.state.engine.call(lambda _: preload(self.state)))
        await self._preloaded

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> AsyncIterator[Any]:
        """Run one HTTP request through this replica's app: yields (status, headers) first, then the
        body's chunks as the app sends them (a stream stays a stream)."""
        await self._ready()
        async for item in _asgi(self.app, method, path, query, headers, body, self.replica):
            yield item

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop died, or whose startup preload failed (every
        request after it would fail the same way), is replaced."""
        if not self.state.engine.alive:
            raise RuntimeError(f"the engine loop has stopped: {self.state.engine.dead!r}")
        preloaded = self._preloaded
        if preloaded is not None and preloaded.done() and (preloaded.cancelled() or preloaded.exception()):
            raise RuntimeError(f"preloading this replica's adapters failed: {preloaded!r}")


async def _asgi(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                replica: str) -> AsyncIterator[Any]:
    """Drive an ASGI app with one request; yield (status, headers), then body chunks."""
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    done = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays connected until the response is over
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                task.result()  # the app ended without a complete response: raise its error
                raise RuntimeError(f"{method} {path}: the app sent no complete response")
            message = getter.result()
            if message["type"] == "http.response.start":
                out = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                yield message["status"], [*out, (REPLICA_HEADER, replica)]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        done.set()
        if not task.done():
            task.cancel()  # the caller left: the app sees the disconnect and aborts the request


ingress_app = FastAPI(title="loraplex on Ray Serve")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class LoraplexIngress:
    """The HTTP entry point: forwards every request to a replica chosen by its adapter."""

    def __init__(self, replicas: DeploymentHandle, base_model: str) -> None:
        self.replicas = replicas
        self.base_model = base_model

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        adapter = adapter_of(path, body, self.base_model)
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in HOP_HEADERS]
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter)
        stream = handle.handle.remote(request.method, path, request.url.query.encode(), headers, body)
        assert isinstance(stream, DeploymentResponseGenerator)  # stream=True
        try:
            status, out_headers = await stream.__anext__()
        except Exception as e:  # the replica died or could not be reached before answering
            return _unavailable(request, e)
        kept = {k: v for k, v in out_headers if k.lower() not in HOP_HEADERS}
        if not any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in kept.items()):
            # Not a stream: the whole body first, so a replica failing half way is a 503, not a cut body.
            try:
                body = b"".join([chunk async for chunk in stream])
            except Exception as e:
                return _unavailable(request, e)
            return Response(body, status_code=status, headers=kept)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as e:  # cut mid-stream: say so (an SSE error event), never end it cleanly
                log.warning("%s %s was cut by its replica: %r", request.method, path, e)
                message = {"error": f"the replica serving this request failed ({type(e).__name__})",
                           "error_type": "unavailable"}
                yield f"data: {json.dumps(message)}\n\n".encode()

        return StreamingResponse(chunks(), status_code=status, headers=kept)


def _unavailable(request: Request, error: Exception) -> JSONResponse:
    """The 503 of a request whose replica failed before its response was complete."""
    log.warning("%s %s failed on its replica: %r", request.method, request.url.path, error)
    return JSONResponse({"error": f"the replica serving this request failed ({type(error).__name__}); retry",
                         "error_type": "unavailable"}, status_code=503)


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application: `args` are `loraplex serve` options by config field name (strings, as
    `serve run` passes them, or values), plus `num_replicas` (default 2) or `autoscaling_config` (a dict,
    or its JSON), and `replica_cpus` (Ray CPUs per replica, default 1)."""
    args = dict(args)
    num_replicas = int(args.pop("num_replicas", 2))
    autoscaling = args.pop("autoscaling_config", None)
    if isinstance(autoscaling, str):
        autoscaling = json.loads(autoscaling)
    cpus = float(args.pop("replica_cpus", 1))
    engine_config, server_config = configs(args)
    replica = LoraplexReplica.options(  # type: ignore[attr-defined]  # a Deployment, once decorated
        **({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}),
        ray_actor_options={"num_cpus": cpus},
        request_router_config={"request_router_class": f"{__name__}:AdapterAffinityRouter"})
    base_model = engine_config.model.model
    return LoraplexIngress.bind(replica.bind(engine_config, server_config), base_model)  # type: ignore[attr-defined]


def configs(options: dict[str, Any], environ: Mapping[str, str] | None = None) -> tuple[EngineConfig, ServerConfig]:
    """Engine and server configs as `loraplex serve` builds them: options by field name (or a flag's other
    spelling, `model_id` for `model`), strings parsed as the CLI parses them; a field not given takes its
    `$LORAPLEX_*` variable from `environ` (the process's environment by default), then its default."""
    from loraplex.cli import FLAG_ALIASES, PARSERS, env_name

    environ = os.environ if environ is None else environ
    server_fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    engine_fields = {f.name: f for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}
    aliases = {flag.removeprefix("--").replace("-", "_"): name for name, flags in FLAG_ALIASES.items() for flag in flags}
    given: dict[str, Any] = {}
    for name, value in options.items():
        field_name = aliases.get(name, name)
        if field_name not in server_fields and field_name not in engine_fields:
            raise ValueError(f"unknown option {name!r}: not a flag of loraplex serve")
        if field_name in given:
            raise ValueError(f"option {field_name!r} is given twice (as {name!r} too)")
        given[field_name] = value
    for name in (*server_fields, *engine_fields):
        if name not in given and env_name(name) in environ:
            given[name] = environ[env_name(name)]
    server: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    for name, value in given.items():
        field = server_fields.get(name) or engine_fields[name]
        if isinstance(value, str):
            try:
                value = PARSERS[str(field.type)](value)
            except ValueError as e:
                raise ValueError(f"option {name}: {e}") from None
        elif isinstance(value, list):
            value = tuple(value)
        (server if name in server_fields else engine)[name] = value
    return EngineConfig.from_options(**engine), ServerConfig(**server)
