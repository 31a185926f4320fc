"""The engine in its own process, behind AsyncEngine's interface (what the HTTP server uses).

Why: with the engine thread and the HTTP event loop in one process they share the GIL. The engine gives the GIL up
around every PyTorch op (hundreds per step) and the HTTP side takes it for every streamed chunk; on a 2-core CPU
the hand-overs made a batch-16 decode step ~2.5x slower than the same engine alone (150 vs 385 output tok/s on
sharegpt-128 at concurrency 16). Here the child process steps the engine on its main thread (GNU OpenMP is also
slowest when parallel regions start from any other thread) and a small asyncio bridge thread in the child moves
requests in and one batch of outputs per step out over a pipe.

Messages (pickled tuples). Parent -> child: ("add", id, prompt, ids, params, timeout, bypass), ("abort", id, reason),
("warmup",), ("shutdown", drain_timeout), ("stop",). Child -> parent: ("ready", info) | ("load_failed", message),
("added", id), ("fail", id, kind, message), ("out", [(id, RequestOutput)], stats, observer events), ("warm",),
("drained", ok), ("dead", reason).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import signal
import threading
from typing import Any

from ..config import EngineConfig
from ..sampling_params import SamplingParams
from .async_engine import (
    _ADDED,
    AsyncEngine,
    EngineDeadError,
    EngineFrontend,
    EngineObserver,
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
    _RequestState,
)
from .outputs import RequestOutput

# Seen in a multi-model server: two loader threads unpickling tokenizers at once raced on importing `tokenizers`
# (a partially initialised module, then KeyError) and the server failed to start.
_UNPICKLE_LOCK = threading.Lock()

logger = logging.getLogger(__name__)

_ERRORS: dict[str, type[BaseException]] = {
    "value": ValueError,
    "queue_full": QueueFullError,
    "dead": EngineDeadError,
    "shutdown": EngineShutdownError,
    "failed": RequestFailedError,
}


def _error_kind(e: BaseException) -> str:
    for kind, cls in _ERRORS.items():
        if isinstance(e, cls):
            return kind
    return "failed"


# ---- child side -------------------------------------------------------------------------------------------------
class _RecordingObserver(EngineObserver):
    """Collects observer calls made on the engine's thread; the bridge ships them with the next outputs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, tuple]] = []

    def _add(self, name: str, *args: Any) -> None:
        with self._lock:
            self._events.append((name, args))

    def on_step(self, num_tokens: int, duration_s: float, stats: dict[str, float]) -> None:
        self._add("on_step", num_tokens, duration_s, stats)

    def on_new_tokens(self, request_id: str, num_tokens: int, interval_s: float) -> None:
        self._add("on_new_tokens", request_id, num_tokens, interval_s)

    def on_request_finished(self, output: RequestOutput) -> None:
        self._add("on_request_finished", output)

    def drain(self) -> list[tuple[str, tuple]]:
        with self._lock:
            events, self._events = self._events, []
        return events


async def _bridge(conn: Any, engine: AsyncEngine, observer: _RecordingObserver) -> None:
    loop = asyncio.get_running_loop()
    pending: list[tuple[str, RequestOutput]] = []
    flush_scheduled = False
    closed = asyncio.Event()

    def send(msg: tuple) -> None:
        try:
            conn.send(msg)
        except (BrokenPipeError, OSError):
            closed.set()

    def flush() -> None:
        nonlocal flush_scheduled
        flush_scheduled = False
        items, pending[:] = list(pending), []
        send(("out", items, engine.stats(), observer.drain()))

    def queue_output(rid: str, out: RequestOutput) -> None:
        nonlocal flush_scheduled
        pending.append((rid, out))
        if not flush_scheduled:  # one message per step: every stream woken by this step runs before the flush
            flush_scheduled = True
            loop.call_soon(flush)

    async def run_request(rid: str, prompt: Any, ids: Any, params: SamplingParams, timeout: Any, bypass: bool) -> None:
        try:
            stream = await engine.add_request(rid, prompt, params, ids, timeout, bypass)
        except Exception as e:
            send(("fail", rid, _error_kind(e), str(e)))
            return
        send(("added", rid))
        try:
            async with stream:
                async for out in stream:
                    queue_output(rid, out)
        except Exception as e:
            if pending:
                flush()
            send(("fail", rid, _error_kind(e), str(e)))

    async def warmup() -> None:
        await engine.warmup()
        observer.drain()  # the warm-up's events: metrics observe real traffic only
        send(("warm",))

    async def shutdown(timeout: float) -> None:
        drained = await engine.shutdown(timeout)
        if pending:
            flush()
        send(("drained", drained))
        closed.set()

    tasks: set[asyncio.Task] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_readable() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                kind = msg[0]
                if kind == "add":
                    spawn(run_request(*msg[1:]))
                elif kind == "abort":
                    engine.abort(msg[1], msg[2])
                elif kind == "warmup":
                    spawn(warmup())
                elif kind == "shutdown":
                    spawn(shutdown(msg[1]))
                elif kind == "stop":
                    closed.set()
                    return
        except (EOFError, OSError):  # the parent went away
            closed.set()

    loop.add_reader(conn.fileno(), on_readable)
    await closed.wait()
    loop.remove_reader(conn.fileno())
    engine.stop()
    if engine.dead_reason:
        send(("dead", engine.dead_reason))


def _child_main(conn: Any, config: EngineConfig, engine_kwargs: dict[str, Any], log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains on signals and then tells us to stop
    try:
        engine = AsyncEngine.from_config(config, run_in_caller=True, **engine_kwargs)
    except Exception as e:
        logger.error("engine failed to load: %s", e, exc_info=True)
        conn.send(("load_failed", f"{type(e).__name__}: {e}"))
        return
    observer = _RecordingObserver()
    engine.observer = observer
    llm = engine.engine
    conn.send(("ready", {
        "max_model_len": engine.max_model_len,
        "kv_window": engine.kv_window,
        "model_path": llm.model_path,
        "tokenizer": llm.tokenizer,  # pickled: rebuilding it from a GGUF takes seconds
        "stats": engine.stats(),
    }))
    bridge = threading.Thread(target=lambda: asyncio.run(_bridge(conn, engine, observer)), name="tokenmill-bridge")
    bridge.start()
    engine.start()
    engine.run_forever()  # until the bridge calls engine.stop() (or the loop dies)
    if engine.dead_reason:
        try:
            conn.send(("dead", engine.dead_reason))
        except OSError:
            pass
    bridge.join(timeout=10)


# ---- parent side ------------------------------------------------------------------------------------------------
class ProcessEngine(EngineFrontend):
    """AsyncEngine's interface (add_request / generate / abort / warmup / shutdown / stop / stats, observer hooks)
    for an engine running in a child process. The constructor blocks until the model is loaded (run it in a
    thread from async code); `start()` must then be called on the event loop that will use it."""

    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        request_timeout: float | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self._check_limits(max_queued_requests, request_timeout)
        ctx = mp.get_context("spawn")  # never fork a process that may already hold threads
        self._conn, child = ctx.Pipe()
        kwargs = dict(max_queued_requests=max_queued_requests, request_timeout=request_timeout)
        self._proc = ctx.Process(target=_child_main, name="tokenmill-engine", daemon=True,
                                 args=(child, config, kwargs, logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        child.close()
        try:
            self._conn.poll(None)  # wait for the model to load (engines of several models load in parallel)
            with _UNPICKLE_LOCK:  # unpickling the tokenizer imports modules: not safe from two threads at once
                msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if msg[0] == "load_failed":
            self._proc.join(5)
            raise RuntimeError(f"the engine failed to load: {msg[1]}")
        info = msg[1]
        self.max_model_len: int = info["max_model_len"]
        self.kv_window: int | None = info["kv_window"]
        self.model_path: str = info["model_path"]
        self.tokenizer = info["tokenizer"]
        self._stats: dict[str, float] = info["stats"]
        self.observer = observer or EngineObserver()
        self.is_ready = False
        self.dead_reason: str | None = None
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: dict[str, _RequestState] = {}
        self._waiters: dict[str, asyncio.Future] = {}

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._proc.pid

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError) as e:
            self._mark_dead(f"the engine process is gone ({e})")

    async def _request_reply(self, key: str, msg: tuple) -> Any:
        assert self._loop is not None, "call start() first"
        fut = self._loop.create_future()
        self._waiters[key] = fut
        self._send(msg)
        return await fut

    async def warmup(self, num_tokens: int = 4) -> None:
        self.start()
        await self._request_reply("warm", ("warmup",))
        self.is_ready = True

    async def shutdown(self, drain_timeout: float = 30.0) -> bool:
        self._accepting = False
        drained = False
        if not self.is_dead:
            drained = await self._request_reply("drained", ("shutdown", drain_timeout))
        self.stop()
        return bool(drained)

    def stop(self) -> None:
        self._accepting = False
        if self._proc.is_alive():
            self._send(("stop",))
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                logger.warning("engine process did not stop; terminating it")
                self._proc.terminate()
                self._proc.join(5)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
        self._fail_all(EngineShutdownError("the engine has shut down"))

    # ---- requests -------------------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        timeout: float | None = None,
        bypass_queue_bound: bool = False,
    ) -> RequestStream:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason}")
        if not self._accepting:
            raise EngineShutdownError("the engine is shutting down and accepts no new requests")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.start()
        state = _RequestState(request_id, asyncio.get_running_loop())
        self._requests[request_id] = state
        self._send(("add", request_id, prompt, prompt_token_ids, params or SamplingParams(), timeout,
                    bypass_queue_bound))
        return await self._accepted(state)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        if request_id in self._requests and self._proc.is_alive():
            self._send(("abort", request_id, reason))

    # ---- messages from the child ----------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._mark_dead(f"the engine process exited (exit code {self._proc.exitcode})")

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "out":
            _, items, stats, events = msg
            self._stats = stats
            for name, args in events:
                try:
                    getattr(self.observer, name)(*args)
                except Exception:
                    logger.exception("engine observer %s failed", name)
            for rid, out in items:
                state = self._requests.get(rid)
                if state is None:
                    continue
                if out.finished:
                    self._requests.pop(rid, None)
                state.queue.put_nowait(out)
        elif kind == "added":
            state = self._requests.get(msg[1])
            if state is not None:
                state.queue.put_nowait(_ADDED)
        elif kind == "fail":
            _, rid, err_kind, message = msg
            state = self._requests.pop(rid, None)
            if state is not None:
                state.queue.put_nowait(_ERRORS.get(err_kind, RequestFailedError)(message))
        elif kind in ("warm", "drained"):
            fut = self._waiters.pop(kind, None)
            if fut is not None and not fut.done():
                fut.set_result(msg[1] if len(msg) > 1 else None)
        elif kind == "dead":
            self._mark_dead(msg[1])

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None and self._accepting:
            self.dead_reason = reason
            logger.critical("engine died: %s", reason)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
        self._fail_all(EngineDeadError(f"the engine loop died: {reason}"))

    def _fail_all(self, error: BaseException) -> None:
        states, self._requests = list(self._requests.values()), {}
        for state in states:
            state.queue.put_nowait(error)
        for key, fut in list(self._waiters.items()):
            if not fut.done():
                fut.set_exception(type(error)(str(error)))
        self._waiters.clear()
