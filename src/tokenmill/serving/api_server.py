"""The OpenAI-compatible HTTP server: FastAPI app factory, guard middleware (API key, body size, draining) and a
uvicorn runner with a graceful SIGTERM/SIGINT drain.

Lifecycle: the port opens at once and /health answers 503 while the model loads and warms up in the background;
then 200. On SIGTERM/SIGINT new API requests get 503, in-flight ones finish (up to --shutdown-timeout, then they are
aborted), and the process exits 0. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from importlib import resources
from contextlib import asynccontextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine.engine_process import ProcessEngine
from .errors import APIError, error_response
from .metrics import ServerMetrics
from .monitor import PerformanceMonitor
from .openai_serving import OpenAIServing, ServingLimits
from .protocol import ModelCard, ModelList
from .registry import ModelRegistry, ModelSpec, RegistryConfig, ServedModel
from .response_cache import RedisResponseCache, ResponseCache, create_response_cache

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 2 * 2**20


@dataclass
class ServerConfig:
    """Server-wide settings; per-model ones (name, queue bound, timeout) live in the registry's ModelSpec."""

    api_key: str | None = None
    shutdown_timeout: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_n: int = 16
    warmup: bool = True
    monitor_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if not self.monitor_interval_s > 0:
            raise ValueError(f"monitor_interval_s must be positive, got {self.monitor_interval_s}")


@dataclass
class ServerState:
    """What the routes and the middleware share."""

    config: ServerConfig
    registry: ModelRegistry
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    monitor: PerformanceMonitor = field(init=False)
    cache: ResponseCache | None = field(init=False)  # None: --response-cache off
    draining: bool = False
    started: float = field(default_factory=time.time)
    in_flight: int = 0  # HTTP API requests being handled
    on_load_failure: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.monitor = PerformanceMonitor(self.registry, self.registry.config.monitor,
                                          interval_s=self.config.monitor_interval_s)
        self.cache = create_response_cache(self.registry.config.response_cache)
        self.metrics.response_cache = self.cache

    @property
    def load_error(self) -> str | None:
        errors = [f"{m.name}: {m.load_error}" for m in self.registry.models.values() if m.load_error]
        return "; ".join(errors) or None


class GuardMiddleware:
    """Pure ASGI middleware in front of the API: API key (401), draining/loading (503), body size (413), and
    per-endpoint response counts. /health, /metrics and /version stay open."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        cfg = self.state.config
        is_api = path.startswith("/v1/")
        if is_api and cfg.api_key is not None:
            auth = _header(scope, b"authorization") or ""
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                return await self._reply(scope, receive, send, error_response(
                    401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"))
        if is_api and scope["method"] == "POST":
            if self.state.draining:
                return await self._reply(scope, receive, send, error_response(
                    503, "the server is shutting down", code="shutting_down"))
            if not any(m.serving is not None for m in self.state.registry.models.values()):
                msg = f"the model failed to load: {self.state.load_error}" if self.state.load_error else \
                    "the model is still loading; retry shortly"
                return await self._reply(scope, receive, send, error_response(
                    503, msg, code="loading", headers={"Retry-After": "2"}))

        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, too_big = await _read_body(receive, scope, cfg.max_body_bytes)
            if too_big:
                return await self._reply(scope, receive, send, error_response(
                    413, f"the request body is larger than the limit of {cfg.max_body_bytes} bytes",
                    code="body_too_large", headers={"Connection": "close"}))
            receive = _replay(body, receive)

        status_holder: dict[str, Any] = {}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k.lower() == b"x-tokenmill-model":
                        status_holder["model"] = v.decode("latin-1")
            await send(message)

        if is_api:
            self.state.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if is_api:
                self.state.in_flight -= 1
            self._count(path, status_holder.get("status", 500), status_holder.get("model", ""))

    async def _reply(self, scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        self._count(scope["path"], response.status_code, "")
        await response(scope, receive, send)

    def _count(self, path: str, status: int, model: str) -> None:
        """HTTP responses by endpoint and status; `model` is the model that answered ("" when none did)."""
        m = self.state.metrics
        if path.startswith("/v1/"):
            endpoint = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models") else "other"
            m.http_response(model, endpoint, status)
            if status == 401:
                m.reject(model, "unauthorized")
            elif status == 413:
                m.reject(model, "body_too_large")
            elif status == 503 and self.state.draining:
                m.reject(model, "shutting_down")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


_DISCARD_LIMIT = 64 * 2**20  # read (and drop) at most this much of an oversize body so the client sees the 413


async def _read_body(receive: Receive, scope: Scope, limit: int) -> tuple[bytes, bool]:
    declared = _header(scope, b"content-length")
    try:
        declared_len = int(declared) if declared is not None else None
    except ValueError:
        declared_len = None
    too_big = declared_len is not None and declared_len > limit
    if too_big and declared_len > _DISCARD_LIMIT:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        data = message.get("body", b"")
        size += len(data)
        if size > limit:
            too_big = True
        if not too_big:
            chunks.append(data)
        elif size > _DISCARD_LIMIT:
            break
        if not message.get("more_body", False):
            break
    return b"".join(chunks), too_big


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: waits for the client to disconnect

    return wrapped


def create_app(state: ServerState, engine_factory: Callable[[ModelSpec], Any]) -> FastAPI:
    """The FastAPI app. `engine_factory(spec)` (blocking; returns a ProcessEngine or AsyncEngine) runs in a thread
    per model after startup, so the port is open (and /health says 503) while the models load."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.ensure_future(_bring_up(state, engine_factory))
        app.state.bring_up = task
        state.monitor.start()
        try:
            yield
        finally:
            task.cancel()
            state.monitor.stop()
            for m in state.registry.models.values():
                if m.engine is not None:
                    m.engine.stop()
            if state.cache is not None:
                await state.cache.close()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.add_middleware(GuardMiddleware, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else None
        return error_response(400, errs[0].get("msg", "invalid request") if errs else "invalid request", param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(exc.status_code, msg, code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", code="internal_error")

    @app.get("/health")
    async def health() -> Response:
        """200 once every model has come up and while at least one can serve ("ok", or "degraded" when another
        cannot); 503 while loading, draining, or when none can serve. The body details every model (status, error,
        queue depth, running batch, KV-cache use, engine pid)."""
        models = {m.name: m.health() for m in state.registry.models.values()}
        statuses = [h["status"] for h in models.values()]
        if state.draining:
            status = "draining"
        elif any(st == "loading" for st in statuses):  # ready once every model has come up (or failed to)
            status = "loading"
        elif all(st == "ok" for st in statuses):
            status = "ok"
        elif any(st == "ok" for st in statuses):
            status = "degraded"
        elif any(st == "dead" for st in statuses):
            status = "dead"
        else:
            status = "failed"
        errors = [f"{n}: {h['error']}" if len(models) > 1 else h["error"] for n, h in models.items() if h["error"]]
        body = {"status": status, "error": "; ".join(errors) or None, "models": models}
        return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if isinstance(state.cache, RedisResponseCache):
            await state.cache.refresh_stats()
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/monitor")
    async def monitor(window: float | None = None) -> dict[str, Any]:
        if window is not None and not window > 0:
            raise APIError(400, f"window must be positive seconds, got {window}", param="window")
        return state.monitor.snapshot(window)

    @app.get("/dashboard")
    async def dashboard() -> Response:
        page = resources.files("tokenmill.serving").joinpath("dashboard/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = []
        for m in state.registry.models.values():
            engine = m.engine
            cards.append(ModelCard(id=m.name, created=int(state.started), root=engine.model_path if engine else None,
                                   max_model_len=engine.max_model_len if engine else None,
                                   aliases=m.spec.aliases or None))
        router = state.registry.router
        if router is not None:
            cards.append(ModelCard(id=router.name, created=int(state.started), owned_by="tokenmill-router"))
        return ModelList(data=cards).model_dump(exclude_none=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await state.registry.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await state.registry.handle(request, "chat")

    return app


async def _bring_up(state: ServerState, engine_factory: Callable[[ModelSpec], Any]) -> None:
    """Loads every model (in parallel threads), warms each up and attaches its metrics and endpoints. A model
    that fails to load is marked failed; the server exits only when every model failed."""
    cfg = state.config
    if isinstance(state.cache, RedisResponseCache):
        try:
            await state.cache.ping()
        except Exception as e:  # a server without its shared cache still serves; say so loudly
            logger.error("response cache: cannot reach %s (%s); requests will miss until it is back",
                         state.cache.config.backend, e)

    async def one(m: ServedModel) -> None:
        try:
            t0 = time.perf_counter()
            m.engine = await asyncio.to_thread(engine_factory, m.spec)
            logger.info("model %s loaded in %.1fs", m.name, time.perf_counter() - t0)
            m.engine.start()
            if cfg.warmup:
                await m.engine.warmup()
            else:
                m.engine.is_ready = True
            # metrics observe real traffic only (attached after the warm-up)
            m.metrics = state.metrics.add_model(m.name, m.engine.stats)
            m.engine.observer = m.metrics
            m.serving = OpenAIServing(m.engine, m.name, m.metrics, ServingLimits(max_n=cfg.max_n), cache=state.cache)
            logger.info("ready: serving %s (context %d tokens)", m.name, m.engine.max_model_len)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            m.load_error = f"{type(e).__name__}: {e}"
            logger.error("failed to bring up model %s: %s", m.name, m.load_error, exc_info=True)

    await asyncio.gather(*(one(m) for m in state.registry.models.values()))
    if not any(m.serving is not None for m in state.registry.models.values()) and state.on_load_failure is not None:
        state.on_load_failure()


# ---- the uvicorn runner -----------------------------------------------------------------------------------------
class _DrainingServer:
    """Wraps uvicorn.Server: the first SIGTERM/SIGINT starts a drain instead of closing the listener, so new
    requests get a clear 503 while in-flight ones finish; a second signal exits at once."""

    def __init__(self, app: FastAPI, state: ServerState, host: str, port: int, log_level: str) -> None:
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:  # called by uvicorn's signal handler
                outer._on_signal(sig)

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False,
                                timeout_graceful_shutdown=5, lifespan="on")
        self.server = Server(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Future | None = None
        self.exit_code = 0
        state.on_load_failure = self._load_failed

    def _on_signal(self, sig: int) -> None:
        if self.drain_task is not None or self.loop is None:
            logger.warning("signal %d again: exiting now", sig)
            self.server.should_exit = True
            self.server.force_exit = True
            return
        logger.info("signal %d: draining (up to %.0fs)", sig, self.state.config.shutdown_timeout)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        state = self.state
        state.draining = True
        engines = [m.engine for m in state.registry.models.values() if m.engine is not None]
        try:
            results = await asyncio.gather(*(e.shutdown(state.config.shutdown_timeout) for e in engines),
                                           return_exceptions=True)
            if not all(r is True for r in results):
                logger.warning("drain timed out; unfinished requests were aborted")
            end = time.monotonic() + 5.0  # let the handlers write their last bytes
            while state.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.02)
        finally:
            logger.info("drained; exiting")
            self.server.should_exit = True

    def _load_failed(self) -> None:
        self.exit_code = 1
        self.server.should_exit = True

    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()
        if not self.server.started:
            return 1
        return self.exit_code

    def run(self) -> int:
        return asyncio.run(self.serve())


def run_server(registry_config: RegistryConfig, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> int:
    """Serves until SIGTERM/SIGINT; returns the process exit code (0 after a graceful drain)."""
    from ..model.paths import resolve_model_path

    for spec in registry_config.models:  # a wrong path is a clear error now, before the port opens
        resolve_model_path(spec.engine.model)

    def load(spec: ModelSpec) -> ProcessEngine:
        # Each engine steps in its own process (see engine_process.py for the measurements behind this).
        return ProcessEngine(spec.engine, max_queued_requests=spec.max_queued_requests,
                             request_timeout=spec.request_timeout)

    state = ServerState(config, ModelRegistry(registry_config))
    app = create_app(state, load)
    server = _DrainingServer(app, state, host, port, log_level)
    names = ", ".join(m.name for m in registry_config.models)
    logger.info("tokenmill %s: serving %s on http://%s:%d", __version__, names, host, port)
    return server.run()
