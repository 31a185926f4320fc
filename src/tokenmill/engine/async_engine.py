"""AsyncEngine: the LLMEngine step loop on a background thread, one asyncio stream per request.

The engine itself is single-threaded: only the engine thread touches it. asyncio code hands work over through
small locked queues (adds, aborts) and gets results back through per-request asyncio queues fed with
`loop.call_soon_threadsafe`. The thread sleeps on a condition variable when it has nothing to do.

Guarantees:
- `add_request` refuses at once (QueueFullError) when `max_queued_requests` requests are already waiting to be
  scheduled: the waiting queue is bounded, nobody waits forever.
- Every accepted request gets exactly one final output (or an exception) on its stream: finished, aborted,
  timed out, failed, or failed because the engine loop died.
- A stream that is closed or cancelled before it finished aborts its request; the engine thread applies aborts
  before its next step, so the request's KV blocks are free after at most one step.
- An exception inside one step fails the requests in flight but not the loop; only repeated consecutive failures
  (or an error in the loop itself) mark the engine dead.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import EngineConfig
from ..sampling_params import SamplingParams
from .outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:  # the HTTP process uses this module's frontend classes without loading the engine (and torch)
    from .llm_engine import LLMEngine

logger = logging.getLogger(__name__)

_ADDED = object()  # first item on a request's queue once the engine thread accepted it


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped after an unrecoverable error."""


class EngineShutdownError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (the message says why)."""


class EngineObserver:
    """Hooks for metrics. Called on the engine thread; implementations must be quick and thread-safe."""

    def on_step(self, num_tokens: int, duration_s: float, stats: dict[str, float]) -> None:
        pass

    def on_new_tokens(self, request_id: str, num_tokens: int, interval_s: float) -> None:
        """`num_tokens` new tokens arrived `interval_s` after the request's previous ones (not for the first)."""

    def on_request_finished(self, output: RequestOutput) -> None:
        pass


@dataclass
class _RequestState:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    scheduled: bool = False  # got its first output (left the waiting queue)
    finished: bool = False
    num_tokens: int = 0  # generated tokens seen so far (all samples)
    last_token_time: float | None = None


@dataclass
class _PendingAdd:
    state: _RequestState
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    arrival_time: float


class RequestStream:
    """Async iterator over a request's cumulative RequestOutputs; ends after the finished one. `close()` (or
    leaving an `async with` block) before the end aborts the request."""

    def __init__(self, engine: "EngineFrontend", state: _RequestState) -> None:
        self._engine = engine
        self._state = state
        self.finished = False

    @property
    def request_id(self) -> str:
        return self._state.request_id

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        queue = self._state.queue
        try:
            item = await queue.get()
            # Outputs are cumulative: when the consumer lags, skip to the newest one.
            while not queue.empty() and not isinstance(item, BaseException) and not item.finished:
                item = queue.get_nowait()
        except BaseException:  # cancelled (client went away): the request must not keep running
            self.close()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self._state.request_id)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


class EngineFrontend:
    """What AsyncEngine and engine_process.ProcessEngine share: health properties, `generate`, and waiting for the
    engine to accept a request. Subclasses set `dead_reason`, `_accepting`, `_stats` and implement `add_request`."""

    dead_reason: str | None = None
    _accepting: bool = True
    _stats: dict[str, float]
    kv_window: int | None = None  # --kv-window: requests are not limited to max_model_len

    @staticmethod
    def _check_limits(max_queued_requests: int | None, request_timeout: float | None) -> None:
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be at least 1, got {max_queued_requests}")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {request_timeout}")

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    def stats(self) -> dict[str, float]:
        """LLMEngine.stats() as of the latest step (safe to call from any thread)."""
        return self._stats

    async def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                          prompt_token_ids: list[int] | None = None, timeout: float | None = None,
                          bypass_queue_bound: bool = False) -> "RequestStream":
        raise NotImplementedError

    def abort(self, request_id: str, reason: str = "abort") -> None:
        raise NotImplementedError

    async def _accepted(self, state: _RequestState) -> "RequestStream":
        """Waits for the engine's verdict on a request just handed over: its stream, or the error it raised."""
        stream = RequestStream(self, state)
        try:
            first = await state.queue.get()
        except BaseException:
            stream.close()
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            raise first
        assert first is _ADDED
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        timeout: float | None = None,
        bypass_queue_bound: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative outputs, the last one finished. Closing or cancelling the iteration
        early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, prompt_token_ids, timeout, bypass_queue_bound)
        async with stream:
            async for out in stream:
                yield out


class AsyncEngine(EngineFrontend):
    """Runs `LLMEngine.step()` on a background thread for asyncio callers."""

    def __init__(
        self,
        engine: LLMEngine,
        max_queued_requests: int | None = None,
        request_timeout: float | None = None,
        observer: EngineObserver | None = None,
        max_consecutive_step_failures: int = 3,
        run_in_caller: bool = False,
    ) -> None:
        """`run_in_caller=True`: `start()` does not spawn the engine thread; the owner calls `run_forever()` from
        the thread that should step the engine. The server's engine process (engine_process.py) steps it on its
        main thread: with GNU OpenMP (PyTorch's CPU backend) every parallel region started from any other thread
        pays a worker wake-up (~0.1 ms on the 2-core test machine), which made a whole decode step 2.3x slower."""
        self._check_limits(max_queued_requests, request_timeout)
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.request_timeout = request_timeout
        self.observer = observer or EngineObserver()
        self.max_consecutive_step_failures = max_consecutive_step_failures

        self._cond = threading.Condition()
        self._requests: dict[str, _RequestState] = {}  # every accepted, unfinished request (guarded by _cond)
        self._pending_adds: list[_PendingAdd] = []
        self._pending_aborts: list[tuple[str, str]] = []
        self._num_queued = 0  # accepted requests not yet scheduled (guarded by _cond)
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.run_in_caller = run_in_caller
        self._started = False
        self.dead_reason: str | None = None
        self.is_ready = False
        self._stats: dict[str, float] = engine.stats()  # snapshot after the latest step

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs: Any) -> "AsyncEngine":
        from .llm_engine import LLMEngine

        return cls(LLMEngine(config), **kwargs)

    # ---- properties -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_window(self) -> int | None:
        return self.engine.kv_window

    @property
    def model_path(self) -> str:
        return self.engine.model_path

    @property
    def num_unfinished(self) -> int:
        with self._cond:
            return len(self._requests)

    @property
    def num_queued(self) -> int:
        with self._cond:
            return self._num_queued

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.run_in_caller:
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        """Steps the engine in the calling thread until `stop()` (only for `run_in_caller` engines)."""
        if not self.run_in_caller:
            raise RuntimeError("this engine runs its own thread; run_forever() is for run_in_caller=True")
        self._run()

    async def warmup(self, num_tokens: int = 4) -> None:
        """Runs a few short requests through every path a real request takes (prefill, decode, greedy and random
        sampling with logprobs, n > 1) so that the first real request pays no compilation or allocation.
        Sets `is_ready`."""
        self.start()
        tok = self.tokenizer
        text = "The quick brown fox jumps over the lazy dog. " * 4
        ids = tok.encode(text)[: max(1, min(48, self.max_model_len // 2))]
        max_tokens = max(1, min(num_tokens, self.max_model_len - len(ids)))
        params = [
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
            SamplingParams(temperature=0.8, top_p=0.9, top_k=20, n=2, logprobs=2, max_tokens=max_tokens,
                           ignore_eos=True, seed=0),
        ]
        t0 = time.perf_counter()

        async def one(i: int, p: SamplingParams) -> None:
            async for _ in self.generate(f"warmup-{i}", prompt_token_ids=ids, params=p, bypass_queue_bound=True):
                pass

        await asyncio.gather(*(one(i, p) for i, p in enumerate(params)))
        self.is_ready = True
        logger.info("engine warm-up done in %.2fs", time.perf_counter() - t0)

    async def shutdown(self, drain_timeout: float = 30.0) -> bool:
        """Stops accepting requests, lets in-flight ones finish for up to `drain_timeout` seconds, aborts the rest,
        and stops the engine thread. Returns True when everything finished in time."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, drain_timeout)
        drained = True
        while self.num_unfinished and not self.is_dead:
            if time.monotonic() >= deadline:
                drained = False
                with self._cond:
                    ids = list(self._requests)
                logger.warning("shutdown: %d request(s) still running after %.1fs; aborting them", len(ids), drain_timeout)
                for rid in ids:
                    self.abort(rid)
                break
            await asyncio.sleep(0.02)
        # give the aborts one step to be delivered
        end = time.monotonic() + 2.0
        while self.num_unfinished and not self.is_dead and time.monotonic() < end:
            await asyncio.sleep(0.01)
        self.stop()
        return drained

    def stop(self) -> None:
        """Stops the engine thread (pending requests are failed)."""
        with self._cond:
            self._stopping = True
            self._accepting = False
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
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
        """Queues a request and waits until the engine thread has accepted it. Raises ValueError for a bad
        prompt (as LLMEngine.add_request), QueueFullError when the waiting queue is full, EngineDeadError /
        EngineShutdownError when no request can be taken. `timeout` (seconds, from now) overrides the
        engine-wide `request_timeout`; past it the request ends with finish_reason "timeout"."""
        params = params or SamplingParams()
        timeout = timeout if timeout is not None else (params.timeout or self.request_timeout)
        if timeout is not None and timeout != params.timeout:
            params = dataclasses.replace(params, timeout=timeout)
        state = _RequestState(request_id, asyncio.get_running_loop())
        with self._cond:
            if self.dead_reason is not None:
                raise EngineDeadError(f"the engine is not running: {self.dead_reason}")
            if not self._accepting or self._stopping:
                raise EngineShutdownError("the engine is shutting down and accepts no new requests")
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            if (
                not bypass_queue_bound
                and self.max_queued_requests is not None
                and self._num_queued >= self.max_queued_requests
            ):
                raise QueueFullError(
                    f"the server is at capacity: {self._num_queued} requests are already waiting "
                    f"(max_queued_requests={self.max_queued_requests}); retry later"
                )
            self._requests[request_id] = state
            self._num_queued += 1
            self._pending_adds.append(
                _PendingAdd(state, prompt, prompt_token_ids, params, time.monotonic())
            )
            self._cond.notify()
        return await self._accepted(state)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Thread-safe; the engine thread aborts the request before its next step (unknown ids are ignored)."""
        with self._cond:
            if request_id not in self._requests:
                return
            self._pending_aborts.append((request_id, reason))
            self._cond.notify()

    # ---- engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        failures = 0
        try:
            while True:
                with self._cond:
                    while (
                        not self._stopping
                        and not self._pending_adds
                        and not self._pending_aborts
                        and not engine.has_unfinished_requests()
                    ):
                        self._cond.wait()
                    if self._stopping:
                        break
                    adds, self._pending_adds = self._pending_adds, []
                    aborts, self._pending_aborts = self._pending_aborts, []
                for add in adds:
                    self._apply_add(add)
                for rid, reason in aborts:
                    engine.abort_request(rid, reason)
                t0 = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception as e:
                    failures += 1
                    logger.exception("engine step failed (%d in a row); failing the requests in flight", failures)
                    self._fail_in_flight(RequestFailedError(f"the engine failed while running this request: {e}"))
                    if failures >= self.max_consecutive_step_failures:
                        raise
                    continue
                failures = 0
                duration = time.perf_counter() - t0
                self._stats = engine.stats()
                self._notify_observer("on_step", getattr(engine, "last_step_num_tokens", 0), duration, self._stats)
                self._dispatch(outputs)
        except BaseException as e:  # the loop itself broke: nothing more will run
            self.dead_reason = f"{type(e).__name__}: {e}"
            logger.critical("engine loop died: %s", self.dead_reason, exc_info=True)
            self._fail_all(EngineDeadError(f"the engine loop died: {self.dead_reason}"))

    def _apply_add(self, add: _PendingAdd) -> None:
        state = add.state
        try:
            self.engine.add_request(
                state.request_id, add.prompt, add.params, prompt_token_ids=add.prompt_token_ids,
                arrival_time=add.arrival_time,
            )
        except Exception as e:
            if not isinstance(e, ValueError):
                logger.exception("adding request %s failed", state.request_id)
            self._finish_state(state, e)
            return
        self._post(state, _ADDED)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batch: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for out in outputs:
            with self._cond:
                state = self._requests.get(out.request_id)
            if state is None:
                continue  # e.g. a request already failed by a step error
            try:
                out = _snapshot(out)
                if not state.scheduled:
                    state.scheduled = True
                    with self._cond:
                        self._num_queued -= 1
                num_tokens = sum(len(c.token_ids) for c in out.outputs)
                if num_tokens > state.num_tokens:
                    if state.last_token_time is not None:
                        self._notify_observer("on_new_tokens", out.request_id, num_tokens - state.num_tokens,
                                              now - state.last_token_time)
                    state.num_tokens = num_tokens
                    state.last_token_time = now
                if out.finished:
                    self._notify_observer("on_request_finished", out)
                    self._finish_state(state, out, batch)
                else:
                    self._post(state, out, batch)
            except Exception as e:  # a bug in one request's bookkeeping must not stop the others
                logger.exception("delivering output of request %s failed", out.request_id)
                self.engine.abort_request(out.request_id, "error")
                self._finish_state(state, RequestFailedError(f"internal error: {e}"), batch)
        # One wake-up of each event loop per step, not one per request.
        for loop, items in batch.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                logger.debug("event loop closed; dropping %d outputs", len(items))

    def _notify_observer(self, name: str, *args: Any) -> None:
        try:
            getattr(self.observer, name)(*args)
        except Exception:
            logger.exception("engine observer %s failed", name)

    def _post(self, state: _RequestState, item: Any, batch: dict | None = None) -> None:
        if batch is not None:
            batch.setdefault(state.loop, []).append((state.queue, item))
            return
        try:
            state.loop.call_soon_threadsafe(state.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            logger.debug("event loop of request %s is closed; dropping its output", state.request_id)

    def _finish_state(self, state: _RequestState, final: Any, batch: dict | None = None) -> None:
        with self._cond:
            if state.finished:
                return
            state.finished = True
            self._requests.pop(state.request_id, None)
            if not state.scheduled:
                self._num_queued -= 1
        self._post(state, final, batch)

    def _fail_in_flight(self, error: Exception) -> None:
        """After a failed step: abort every request the engine holds and fail its stream."""
        failed = list(self.engine.groups)
        for rid in failed:
            try:
                self.engine.abort_request(rid, "error")
            except Exception:
                logger.exception("aborting request %s after a failed step failed", rid)
        try:
            self.engine.step()  # drains the aborted outputs; nothing is scheduled
        except Exception:
            logger.exception("draining aborted requests failed")
        with self._cond:
            states = [self._requests[rid] for rid in failed if rid in self._requests]
        for state in states:
            self._finish_state(state, error)
        self._stats = self.engine.stats()

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            states = list(self._requests.values())
            adds, self._pending_adds = self._pending_adds, []
        for state in states:
            self._finish_state(state, error)
        for add in adds:
            self._finish_state(add.state, error)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """Copies the lists the engine keeps appending to, so the asyncio side sees a consistent output."""
    outputs = [
        dataclasses.replace(c, logprobs=None if c.logprobs is None else c.logprobs[: len(c.token_ids)])
        for c in out.outputs
    ]
    prompt_lps = None if out.prompt_logprobs is None else list(out.prompt_logprobs)
    return dataclasses.replace(out, outputs=outputs, prompt_logprobs=prompt_lps)


__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "EngineDeadError",
    "EngineObserver",
    "EngineShutdownError",
    "QueueFullError",
    "RequestFailedError",
    "RequestStream",
]
