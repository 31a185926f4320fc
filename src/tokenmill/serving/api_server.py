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
import os
import time
from contextlib import asynccontextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import EngineConfig
from ..engine.async_engine import AsyncEngine
from ..engine.engine_process import ProcessEngine
from .errors import APIError, error_response
from .metrics import ServerMetrics
from .openai_serving import OpenAIServing, ServingLimits
from .protocol import ModelCard, ModelList

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_BODY_BYTES = 2 * 2**20


@dataclass
class ServerConfig:
    served_model_name: str = DEFAULT_MODEL_NAME
    api_key: str | None = None
    max_queued_requests: int | None = 256
    request_timeout: float | None = None  # seconds; None: no server-wide limit
    shutdown_timeout: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_n: int = 16
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be at least 1, got {self.max_queued_requests}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")


def served_model_name(model: str | None) -> str:
    """The name clients use: the model directory's or file's basename, or SmolLM2-135M-Instruct by default."""
    if model is None:
        return DEFAULT_MODEL_NAME
    return os.path.basename(os.path.normpath(os.path.expanduser(model))) or DEFAULT_MODEL_NAME


@dataclass
class ServerState:
    """What the routes and the middleware share."""

    config: ServerConfig
    engine: AsyncEngine | ProcessEngine | None = None
    serving: OpenAIServing | None = None
    metrics: ServerMetrics | None = None
    draining: bool = False
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    in_flight: int = 0  # HTTP API requests being handled
    on_load_failure: Callable[[], None] | None = None

    def stats(self) -> dict[str, float]:
        return self.engine.stats() if self.engine is not None else {}


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
            if self.state.serving is None:
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

        status_holder: dict[str, int] = {}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        if is_api:
            self.state.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if is_api:
                self.state.in_flight -= 1
            self._count(path, status_holder.get("status", 500))

    async def _reply(self, scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        self._count(scope["path"], response.status_code)
        await response(scope, receive, send)

    def _count(self, path: str, status: int) -> None:
        m = self.state.metrics
        if m is not None and path.startswith("/v1/"):
            endpoint = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models") else "other"
            m.http_response(endpoint, status)
            if status == 401:
                m.reject("unauthorized")
            elif status == 413:
                m.reject("body_too_large")
            elif status == 503 and self.state.draining:
                m.reject("shutting_down")


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


def create_app(state: ServerState, engine_loader: Any | None = None) -> FastAPI:
    """The FastAPI app. `engine_loader` (a blocking callable returning an AsyncEngine) runs in a thread after
    startup, so the port is open (and /health says 503) while the model loads; alternatively set `state.engine`
    before startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.ensure_future(_bring_up(state, engine_loader))
        app.state.bring_up = task
        try:
            yield
        finally:
            task.cancel()
            if state.engine is not None:
                state.engine.stop()

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
        engine = state.engine
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if engine is None or not engine.is_ready or state.serving is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        if engine.is_dead:
            return JSONResponse({"status": "dead", "error": engine.dead_reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return PlainTextResponse("", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = state.engine
        card = ModelCard(id=state.config.served_model_name, created=int(state.started),
                         root=engine.model_path if engine else None,
                         max_model_len=engine.max_model_len if engine else None)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        assert state.serving is not None  # the middleware answers 503 before that
        return await state.serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        assert state.serving is not None
        return await state.serving.chat(request)

    return app


async def _bring_up(state: ServerState, engine_loader: Any | None) -> None:
    cfg = state.config
    try:
        if state.engine is None:
            if engine_loader is None:
                raise RuntimeError("no engine and no engine loader")
            t0 = time.perf_counter()
            state.engine = await asyncio.to_thread(engine_loader)
            logger.info("model loaded in %.1fs", time.perf_counter() - t0)
        engine = state.engine
        engine.start()
        if cfg.warmup:
            await engine.warmup()
        else:
            engine.is_ready = True
        # metrics observe real traffic only (attached after the warm-up)
        state.metrics = ServerMetrics(cfg.served_model_name, state.stats)
        engine.observer = state.metrics
        state.serving = OpenAIServing(engine, cfg.served_model_name, state.metrics, ServingLimits(max_n=cfg.max_n))
        logger.info("ready: serving %s (context %d tokens)", cfg.served_model_name, engine.max_model_len)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        logger.error("failed to bring up the engine: %s", state.load_error, exc_info=True)
        if state.on_load_failure is not None:
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
        engine = state.engine
        try:
            if engine is not None:
                drained = await engine.shutdown(state.config.shutdown_timeout)
                if not drained:
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


def run_server(engine_config: EngineConfig, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> int:
    """Serves until SIGTERM/SIGINT; returns the process exit code (0 after a graceful drain)."""
    from ..model.loader import resolve_model_path

    resolve_model_path(engine_config.model)  # a wrong path is a clear error now, before the port opens

    def load() -> ProcessEngine:
        # The engine steps in its own process (see engine_process.py for the measurements behind this).
        return ProcessEngine(engine_config, max_queued_requests=config.max_queued_requests,
                             request_timeout=config.request_timeout)

    state = ServerState(config)
    app = create_app(state, load)
    server = _DrainingServer(app, state, host, port, log_level)
    logger.info("tokenmill %s: serving %s on http://%s:%d", __version__, config.served_model_name, host, port)
    return server.run()
