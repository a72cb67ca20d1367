"""AsyncEngine: the engine's step loop on its own thread, behind an asyncio facade.

The engine is single-threaded by design: only the loop thread touches it (given a factory, the loop
thread also builds it, so the model's torch work all runs on one thread: see `loraplex.runtime`).
Callers on the event loop hand it work through a thread-safe inbox (new requests, aborts, admin
calls) and receive each request's outputs on an asyncio queue of their own. torch releases the GIL
inside its kernels, so the event loop stays responsive while a step runs.

One bad request never takes the loop down: an error while adding a request, or one the engine ties to
a request inside a step (its adapter's load, its inputs, logits, grammar, detokenizer), fails that
request only and is no step failure. An error of a step as a whole (the forward pass) fails the
requests in flight and the loop goes on; only repeated step failures in a row stop the loop, and a
server then exits (`loraplex.server.main`) rather than answer 503 for ever.

Draining for shutdown: `drain()` refuses new requests (ShuttingDown, HTTP 503) while those in flight
go on; `cancel_all()` then ends whatever is left with an error, so a cut stream says it was cut.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loraplex.engine.engine import Engine, EngineStepError
from loraplex.engine.request import RequestOutput, SamplingParams
from loraplex.lora.merge import MergeSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CONSECUTIVE_STEP_FAILURES = 3


class Overloaded(Exception):
    """The server is at its concurrent-request limit; the request is refused at once (HTTP 429)."""


class EngineDead(Exception):
    """The engine loop has stopped; no request can be served (HTTP 503)."""


class ShuttingDown(EngineDead):
    """The server is draining for shutdown: no new request is taken, and one still running when the
    shutdown timeout ends is cut with this error (HTTP 503)."""


__all__ = ["AsyncEngine", "EngineDead", "EngineStepError", "Overloaded", "ShuttingDown"]


@dataclass
class _Stream:
    """Where one request's outputs go: an asyncio queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    every_token: bool = True
    """False: only the first and the final output are delivered (a caller that does not stream)."""
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    delivered: bool = False


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    adapter_id: str | None
    adapter_source: str | None
    adapter_token: str | None = field(repr=False)
    merge: MergeSpec | None = None
    every_token: bool = True


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    future: Future[Any]


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine], max_concurrent_requests: int = 128) -> None:
        """`engine`: the engine, or a function that builds it, which `start()` then runs on the loop thread."""
        if max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
        self.engine: Engine
        self._make_engine: Callable[[], Engine] | None = None
        if isinstance(engine, Engine):
            self.engine = engine
        else:
            self._make_engine = engine
        self._built: Future[None] = Future()
        self.max_concurrent_requests = max_concurrent_requests
        self.on_step: Callable[[list[RequestOutput], float], None] | None = None
        """Called on the loop thread after each step with its outputs and duration (metrics)."""
        self.num_step_failures = 0
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._stopping = threading.Event()
        self.dead: BaseException | None = None
        self.draining = False
        """Set by `drain()`: new requests are refused with ShuttingDown."""

    # ---- caller side (event loop) ----

    def start(self) -> None:
        """Start the loop thread (once; later calls do nothing). With a factory, return when the engine is
        built, raising the factory's error if it fails."""
        if self._thread.ident is None:
            self._thread.start()
        self._built.result()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def drain(self) -> None:
        """Refuse new requests from now on (ShuttingDown); the ones in flight go on."""
        self.draining = True

    def cancel_all(self, error: Exception) -> None:
        """End every request in flight with `error` (on the loop's next turn), freeing what each holds."""
        self._inbox.put(_Call(lambda _: self._fail_streams(error, abort=True), Future()))

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       prompt: str | None = None, adapter_id: str | None = None, adapter_source: str | None = None,
                       adapter_token: str | None = None, merge: MergeSpec | None = None,
                       every_token: bool = True) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its cumulative outputs, one per generated token, the last finished.

        Raises Overloaded when `max_concurrent_requests` requests are in flight, EngineDead when the loop
        has stopped, and the engine's own error (ValueError, AdapterError ...) when the request is refused.
        Leaving the iteration early (a client that disconnects) aborts the request, which frees its KV
        blocks and adapter reference on the loop's next turn. With `every_token=False` only the first
        output (for time-to-first-token) and the final one are delivered: a caller that does not stream
        then costs the event loop nothing per token, which on a small machine is CPU the steps keep.
        """
        if not self.alive:
            raise EngineDead(f"the engine loop has stopped: {self.dead!r}")
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        stream = _Stream(asyncio.get_running_loop(), every_token)
        with self._lock:
            if len(self._streams) >= self.max_concurrent_requests:
                raise Overloaded(f"{self.max_concurrent_requests} requests are in flight, the configured "
                                 "maximum (--max-concurrent-requests); retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._inbox.put(_Add(request_id, prompt_token_ids, params, prompt, adapter_id, adapter_source, adapter_token,
                             merge, every_token))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine holds nothing for a refused or failed request
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(_Abort(request_id))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the loop thread between steps (admin operations) and return its result."""
        if not self.alive:
            raise EngineDead(f"the engine loop has stopped: {self.dead!r}")
        future: Future[T] = Future()
        self._inbox.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    # ---- loop thread ----

    def _run(self) -> None:
        if self._make_engine is not None:
            try:
                self.engine = self._make_engine()
            except BaseException as e:
                self.dead = e
                self._built.set_exception(e)
                return
        self._built.set_result(None)
        failures = 0
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished())
                if self._stopping.is_set() or not self.engine.has_unfinished():
                    continue
                start = time.perf_counter()
                try:
                    # Errors the engine ties to one request come back in that request's output, not here.
                    outputs = self.engine.step()
                    failures = 0
                except Exception as e:  # the step as a whole failed: fail the requests in flight, keep serving
                    failures += 1
                    self.num_step_failures += 1
                    log.exception("engine step failed (%d in a row)", failures)
                    self._fail_streams(EngineStepError(f"generation failed: {e!r}"), abort=True)
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise
                    continue
                if self.on_step is not None:
                    try:
                        self.on_step(outputs, time.perf_counter() - start)
                    except Exception:  # an observer (metrics) must not stop the loop
                        log.exception("the on_step callback failed")
                self._deliver_all([(out.request_id, out.error or out) for out in outputs])
        except BaseException as e:
            self.dead = e
            log.critical("engine loop stopped: %r", e)
            self._fail_streams(EngineDead(f"the engine loop has stopped: {e!r}"), abort=False)
            return
        self._fail_streams(EngineDead("the engine has stopped"), abort=False)  # stop(): nobody is left waiting

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            try:
                self._handle(item)
            except Exception as e:  # one inbox item (an abort of a broken request ...) never stops the loop
                log.exception("handling %r failed", item)
                if isinstance(item, _Add):
                    self._deliver(item.request_id, e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: _Add | _Abort | _Call) -> None:
        if isinstance(item, _Abort):
            self.engine.abort(item.request_id)
        elif isinstance(item, _Call):
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn(self.engine))
                except Exception as e:
                    item.future.set_exception(e)
        else:
            with self._lock:
                wanted = item.request_id in self._streams  # the caller may have gone already
            if not wanted:
                return
            try:
                self.engine.add_request(item.request_id, item.prompt_token_ids, item.params,
                                        prompt=item.prompt, adapter_id=item.adapter_id,
                                        adapter_source=item.adapter_source, adapter_token=item.adapter_token,
                                        merge=item.merge, every_token=item.every_token)
            except Exception as e:  # refused: this request only
                self._deliver(item.request_id, e)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop, not one per request:
        on a small machine every wake-up of the event loop thread steals a core from the step's kernels."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    if (not stream.every_token and stream.delivered and isinstance(item, RequestOutput)
                            and not item.finished):
                        continue
                    stream.delivered = True
                    by_loop.setdefault(stream.loop, []).append((stream, item))
                elif isinstance(item, RequestOutput) and not item.finished:
                    self.engine.abort(request_id)  # nobody is listening any more
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's event loop is closed
                for stream_item in batch:
                    item = stream_item[1]
                    if isinstance(item, RequestOutput):
                        self.engine.abort(item.request_id)

    def _fail_streams(self, error: Exception, abort: bool) -> None:
        """Deliver `error` to every request in flight; with `abort`, also free them in the engine."""
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            if abort:
                try:
                    self.engine.abort(request_id)
                except Exception:  # the caller still gets its error; the engine's state is the log's concern
                    log.exception("aborting %s failed", request_id)
            self._deliver(request_id, error)


def _put_all(batch: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.queue.put_nowait(item)
