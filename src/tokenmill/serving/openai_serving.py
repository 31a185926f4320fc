"""The OpenAI completions and chat-completions endpoints on top of an AsyncEngine: request -> prompts and
SamplingParams (with the limits), engine streams -> a JSON response or SSE chunks."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from ..engine.outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from .errors import APIError
from .logprobs import LogprobFormatter, concat_logprobs
from .metrics import ModelMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, UsageInfo
from .response_cache import ResponseCache, cache_key, cached_usage, is_cacheable, replay_chunks

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("tokenmill.requests")

_LONG_TEXT = 20_000  # characters; longer texts are tokenised off the event loop


@dataclass
class ServingLimits:
    max_n: int = 16
    retry_after_s: int = 1


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _Job:
    """One HTTP request: its engine streams (one per prompt) and what the response needs."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    prompts: list[_Prompt]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # completions: top-N; chat: top-N when logprobs is on
    streams: list[RequestStream] = field(default_factory=list)
    disconnected: bool = False
    route: str = "explicit"
    cache_key: str | None = None  # set when the response cache may store the answer
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.monotonic)


class OpenAIServing:
    """One model's endpoints. The registry parses the body and picks the model; `handle` does the rest."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        metrics: ModelMetrics,
        limits: ServingLimits | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.limits = limits or ServingLimits()
        self.cache = cache
        self.tokenizer = engine.tokenizer
        self.lp = LogprobFormatter(engine.tokenizer)

    # ---- entry points -----------------------------------------------------------------------------------------
    async def handle(self, request: Request, kind: str, req: Any, route: str = "explicit") -> Response:
        """Answers a parsed CompletionRequest (kind "completion") or ChatCompletionRequest ("chat"); `route` says
        how the registry chose this model (metrics and the X-Tokenmill-Route header)."""
        problem = req.unsupported()
        if problem is not None:
            raise APIError(400, problem[1], param=problem[0], code="unsupported")
        job = await (self._completion_job(req) if kind == "completion" else self._chat_job(req))
        job.route = route
        return await self._run(request, job, req.user)

    async def _completion_job(self, req: CompletionRequest) -> _Job:
        prompts = await self._completion_prompts(req.prompt)
        params = self._sampling_params(req, prompts, "prompt", req.max_tokens, req.logprobs,
                                       prompt_logprobs=req.logprobs if req.echo else None)
        return _Job("completion", f"cmpl-{uuid.uuid4().hex}", self.model_name, prompts, params, req.n, req.stream,
                    _include_usage(req), echo=req.echo, logprobs=req.logprobs)

    async def _chat_job(self, req: ChatCompletionRequest) -> _Job:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # a template that raises (e.g. raise_exception for unsupported role order)
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        ids = await self._encode(text, add_special_tokens=False)
        prompts = [_Prompt(text, ids)]
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = self._sampling_params(req, prompts, "messages", max_tokens, top, max_tokens_param=param_name)
        return _Job("chat", f"chatcmpl-{uuid.uuid4().hex}", self.model_name, prompts, params, req.n, req.stream,
                    _include_usage(req), logprobs=top)

    # ---- request -> job ---------------------------------------------------------------------------------------
    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _LONG_TEXT:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens)

    async def _completion_prompts(self, prompt: Any) -> list[_Prompt]:
        if isinstance(prompt, str):
            return [_Prompt(prompt, await self._encode(prompt))]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], str):
            return [_Prompt(p, await self._encode(p)) for p in prompt]
        if isinstance(prompt[0], int):
            return [_Prompt(None, list(prompt))]
        return [_Prompt(None, list(p)) for p in prompt]

    def _sampling_params(
        self,
        req: Any,
        prompts: list[_Prompt],
        prompt_param: str,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        max_tokens_param: str = "max_tokens",
    ) -> SamplingParams:
        limit = self.engine.max_model_len
        windowed = self.engine.kv_window is not None  # --kv-window: sessions may run past the context length
        if not 1 <= req.n <= self.limits.max_n:
            raise APIError(400, f"n must be between 1 and {self.limits.max_n}, got {req.n}", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param)
        longest = 0
        for p in prompts:
            n = len(p.token_ids)
            if n == 0:
                raise APIError(400, f"the {prompt_param} is empty (no tokens)", param=prompt_param)
            if n >= limit and not windowed:
                raise APIError(400, f"this model's maximum context length is {limit} tokens, but the {prompt_param} "
                                    f"has {n} tokens (at least one more is needed for the completion)",
                               param=prompt_param, code="context_length_exceeded")
            if max_tokens is not None and n + max_tokens > limit and not windowed:
                raise APIError(400, f"this model's maximum context length is {limit} tokens, but {n + max_tokens} "
                                    f"were requested ({n} in the {prompt_param}, {max_tokens} in the completion); "
                                    f"reduce the {prompt_param} or {max_tokens_param}",
                               param=max_tokens_param, code="context_length_exceeded")
            longest = max(longest, n)
        kwargs: dict[str, Any] = dict(
            n=req.n,
            max_tokens=max_tokens if max_tokens is not None else (limit if windowed else limit - longest),
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            speculative=req.speculative,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            timeout=req.timeout,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0]
            if param == "max_tokens":
                param = max_tokens_param
            raise APIError(400, msg, param=param if param in kwargs or param == max_tokens_param else None) from None

    # ---- running ----------------------------------------------------------------------------------------------
    async def _run(self, request: Request, job: _Job, user: str | None) -> Response:
        headers = {"X-Tokenmill-Model": job.model, "X-Tokenmill-Route": job.route}
        cached, cache_state = await self._cache_lookup(request, job)
        if cache_state is not None:
            headers["X-Tokenmill-Cache"] = cache_state
        if cached is not None:
            self.metrics.routed(job.route)
            return self._replay(job, cached, headers, user)
        status = 200
        try:
            await self._add(job)
        except APIError as e:
            self._log(job, e.status, user, error=e.message)
            raise
        self.metrics.routed(job.route)  # counted where the request is taken (a full queue passes it on)
        if job.stream:
            return StreamingResponse(self._stream(request, job, user), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        finals: list[RequestOutput] = []
        try:
            finals = await _with_disconnect_watch(request, job, self._collect(job))
            body = self._response_body(job, finals)
        except APIError as e:
            status, error = (499, "client disconnected") if job.disconnected else (e.status, e.message)
            self._log(job, status, user, finals, error=error)
            raise
        await self._cache_store(job, body)
        self._log(job, status, user, finals)
        return JSONResponse(body, headers=headers)

    # ---- response cache ---------------------------------------------------------------------------------------
    async def _cache_lookup(self, request: Request, job: _Job) -> tuple[dict | None, str | None]:
        """(cached body or None, "hit" | "miss" | "bypass" | None when the request is not cacheable).
        `Cache-Control: no-cache` skips the lookup but stores the fresh answer; `no-store` skips both."""
        if self.cache is None or not is_cacheable(job.params):
            return None, None
        cc = request.headers.get("cache-control", "").lower()
        if "no-store" not in cc:
            job.cache_key = cache_key(job.model, job.kind, [p.token_ids for p in job.prompts], job.params,
                                      echo=job.echo, logprobs=job.logprobs)
        if "no-cache" in cc or "no-store" in cc:
            self.metrics.cache_lookup("bypass")
            return None, "bypass"
        assert job.cache_key is not None
        value = await self.cache.get(job.cache_key)
        self.metrics.cache_lookup("hit" if value is not None else "miss")
        return value, "hit" if value is not None else "miss"

    async def _cache_store(self, job: _Job, body: dict) -> None:
        if self.cache is not None and job.cache_key is not None:
            await self.cache.put(job.cache_key, body)

    def _replay(self, job: _Job, cached: dict, headers: dict[str, str], user: str | None) -> Response:
        body = {**cached, "id": job.id, "created": job.created, "model": job.model,
                "usage": cached_usage(cached["usage"])}
        self._log(job, 200, user, cached_body=body)
        if not job.stream:
            return JSONResponse(body, headers=headers)

        async def replay() -> AsyncIterator[str]:
            for c in replay_chunks(body, job.include_usage):
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(replay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    async def _add(self, job: _Job) -> None:
        for p in job.prompts:
            self.metrics.prompt_seen(p.token_ids)
        try:
            for i, p in enumerate(job.prompts):
                job.streams.append(await self.engine.add_request(
                    f"{job.id}-{i}", p.text, job.params, prompt_token_ids=p.token_ids))
        except BaseException as e:
            for s in job.streams:
                s.close()
            if isinstance(e, QueueFullError):
                self.metrics.reject("queue_full")
                raise APIError(429, str(e), code="queue_full",
                               headers={"Retry-After": str(self.limits.retry_after_s)}) from None
            if isinstance(e, (EngineShutdownError, EngineDeadError)):
                self.metrics.reject("unavailable")
                raise APIError(503, str(e), code="unavailable") from None
            if isinstance(e, ValueError):
                self.metrics.reject("invalid")
                raise APIError(400, str(e), param="prompt" if job.kind == "completion" else "messages") from None
            raise

    async def _collect(self, job: _Job) -> list[RequestOutput]:
        async def last(stream: RequestStream) -> RequestOutput:
            out = None
            async with stream:
                async for out in stream:
                    pass
            assert out is not None
            return out

        try:
            return list(await asyncio.gather(*(last(s) for s in job.streams)))
        except (RequestFailedError, EngineDeadError, EngineShutdownError) as e:
            for s in job.streams:
                s.close()
            raise _engine_error(e) from None

    def _response_body(self, job: _Job, finals: list[RequestOutput]) -> dict[str, Any]:
        reasons = [c.finish_reason for out in finals for c in out.outputs]
        if "timeout" in reasons:
            raise APIError(504, "the request timed out before it finished and was aborted", code="request_timeout")
        if "error" in reasons:
            errs = [o.error for o in finals if o.error]
            raise APIError(500, f"the request failed: {errs[0] if errs else 'engine error'}", code="engine_error")
        if "abort" in reasons:
            raise APIError(503, "the request was aborted (client gone or server shutting down)", code="aborted")
        usage = _usage(finals)
        choices = []
        for pi, out in enumerate(finals):
            for c in out.outputs:
                idx = pi * job.n + c.index
                if job.kind == "chat":
                    choices.append({
                        "index": idx,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": self.lp.chat(c.token_ids, c.logprobs, job.logprobs) if job.logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    })
                else:
                    text, lp = c.text, None
                    if job.echo:
                        text = self._prompt_text(job, pi, out) + text
                    if job.logprobs is not None:
                        lp = self._completion_logprobs(job, pi, out, c)
                    choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                                    "stop_reason": c.stop_reason})
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices,
                "usage": usage.model_dump()}

    # ---- streaming --------------------------------------------------------------------------------------------
    async def _stream(self, request: Request, job: _Job, user: str | None) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        started: set[int] = set()
        done: set[int] = set()
        lp_offsets: dict[int, int] = {}  # completions logprobs: text_offset of each choice's next token
        finals: dict[int, RequestOutput] = {}
        status = 200
        error: str | None = None
        watch = _watch_disconnect(request, job)
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": job.id, "object": obj, "created": job.created, "model": job.model,
                                    "choices": choices}
            if job.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if job.kind == "chat":  # the role comes first, for every choice
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(job.prompts) * job.n)])
            async for pi, out in _merge(job.streams):
                choices = []
                for c in out.outputs:
                    idx = pi * job.n + c.index
                    if idx in done:
                        continue  # its final chunk went out already
                    if not c.finished and not c.token_ids:
                        continue  # prompt still being processed
                    text = c.text if c.finished or out.finished else c.stream_text
                    delta = text[sent_text.get(idx, 0):]
                    ntok = sent_tokens.get(idx, 0)
                    new_ids = c.token_ids[ntok:]
                    new_lps = c.logprobs[ntok:] if c.logprobs is not None else None
                    first = idx not in started
                    if not delta and not c.finished and not (first and job.echo):
                        continue
                    started.add(idx)
                    if c.finished:
                        done.add(idx)
                    sent_text[idx] = len(text)
                    sent_tokens[idx] = len(c.token_ids)
                    choices.append(self._stream_choice(job, pi, out, c, idx, delta, new_ids, new_lps, first,
                                                       lp_offsets))
                if choices:
                    yield chunk(choices)
                if out.finished:
                    finals[pi] = out
            if job.cache_key is not None and len(finals) == len(job.prompts) and all(
                    c.finish_reason in ("stop", "length") for o in finals.values() for c in o.outputs):
                await self._cache_store(job, self._response_body(job, [finals[i] for i in range(len(finals))]))
            if job.include_usage:
                yield chunk([], _usage(list(finals.values())).model_dump())
        except (RequestFailedError, EngineDeadError, EngineShutdownError) as e:
            err = _engine_error(e)
            status, error = err.status, err.message
            yield f"data: {json.dumps(err.body())}\n\n"
        except asyncio.CancelledError:
            status, error = 499, "client disconnected"
            raise
        finally:
            watch.cancel()
            for s in job.streams:
                s.close()
            outs = list(finals.values())
            if status == 200 and any(c.finish_reason in ("abort", "timeout", "error") for o in outs for c in o.outputs):
                reasons = sorted({c.finish_reason for o in outs for c in o.outputs})
                status, error = (499 if "abort" in reasons else 504 if "timeout" in reasons else 500), ",".join(reasons)
            self._log(job, status, user, outs, error=error)
        yield "data: [DONE]\n\n"

    def _stream_choice(self, job: _Job, pi: int, out: RequestOutput, c: CompletionOutput, idx: int, delta: str,
                       new_ids: list[int], new_lps: list[dict[int, float]] | None, first: bool,
                       lp_offsets: dict[int, int]) -> dict:
        finish = c.finish_reason
        if job.kind == "chat":
            lp = None
            if job.logprobs is not None and new_lps is not None:
                lp = self.lp.chat(new_ids, new_lps, job.logprobs)
            return {"index": idx, "delta": {"content": delta}, "logprobs": lp, "finish_reason": finish,
                    "stop_reason": c.stop_reason if finish else None}
        text = delta
        lp = None
        if first and job.echo:
            prompt_text = self._prompt_text(job, pi, out)
            text = prompt_text + delta
            lp_offsets[idx] = len(prompt_text)
        if job.logprobs is not None and new_lps is not None:
            lp = self.lp.tokens(new_ids, new_lps, job.logprobs, lp_offsets.get(idx, 0))
            lp_offsets[idx] = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else lp_offsets.get(idx, 0)
            if first and job.echo:
                lp = concat_logprobs(self.lp.prompt(out, job.logprobs), lp)
        return {"index": idx, "text": text, "logprobs": lp.model_dump() if lp else None, "finish_reason": finish,
                "stop_reason": c.stop_reason if finish else None}

    # ---- logprobs ---------------------------------------------------------------------------------------------
    def _completion_logprobs(self, job: _Job, pi: int, out: RequestOutput, c: CompletionOutput) -> dict:
        assert job.logprobs is not None
        if job.echo:
            prompt = self.lp.prompt(out, job.logprobs)
            gen_offset = len(self._prompt_text(job, pi, out))
            generated = self.lp.tokens(c.token_ids, c.logprobs or [], job.logprobs, gen_offset)
            return concat_logprobs(prompt, generated).model_dump()
        return self.lp.tokens(c.token_ids, c.logprobs or [], job.logprobs, 0).model_dump()

    def _prompt_text(self, job: _Job, pi: int, out: RequestOutput) -> str:
        p = job.prompts[pi]
        if p.text is None:
            p.text = self.tokenizer.decode(p.token_ids)
        return p.text

    # ---- logging ----------------------------------------------------------------------------------------------
    def _log(self, job: _Job, status: int, user: str | None, finals: list[RequestOutput] | None = None,
             error: str | None = None, cached_body: dict | None = None) -> None:
        finals = finals or []
        prompt_tokens = sum(len(p.token_ids) for p in job.prompts)
        completion_tokens = sum(len(c.token_ids) for o in finals for c in o.outputs)
        ttfts = [o.metrics.ttft for o in finals if o.metrics.ttft is not None]
        reasons = sorted({str(c.finish_reason) for o in finals for c in o.outputs})
        if cached_body is not None:
            completion_tokens = cached_body["usage"]["completion_tokens"]
            reasons = sorted({str(c["finish_reason"]) for c in cached_body["choices"]})
        record = {
            "request_id": job.id, "endpoint": job.kind, "model": job.model, "status": status, "stream": job.stream,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "n": job.n,
            "latency_s": round(time.monotonic() - job.start, 4),
            "ttft_s": round(min(ttfts), 4) if ttfts else None,
            "finish_reason": ",".join(reasons) or None, "user": user, "error": error,
            "route": job.route, "cache": "hit" if cached_body is not None else None,
        }
        level = logging.INFO if status < 500 else logging.WARNING
        request_logger.log(level, " ".join(f"{k}={v}" for k, v in record.items() if v is not None),
                           extra={"tokenmill_request": record})


def _include_usage(req: Any) -> bool:
    return bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)


def _usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), code="engine_error")
    return APIError(503, str(e), code="unavailable")


def _abort_all(job: _Job) -> None:
    logger.info("client of %s disconnected; aborting", job.id)
    job.disconnected = True
    for s in job.streams:
        s.close()


async def _wait_disconnect(request: Request) -> bool:
    """Returns True once the client has gone away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return True


def _watch_disconnect(request: Request, job: _Job) -> asyncio.Future:
    """A task that aborts the job's requests when the client disconnects; cancel it when the job is done."""

    def done(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            _abort_all(job)

    watch = asyncio.ensure_future(_wait_disconnect(request))
    watch.add_done_callback(done)
    return watch


async def _with_disconnect_watch(request: Request, job: _Job, work: Any) -> Any:
    """Runs `work` while watching for the client to disconnect; a disconnect aborts the job's requests (the work
    then finishes with finish_reason "abort")."""
    watch = _watch_disconnect(request, job)
    try:
        return await work
    finally:
        watch.cancel()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several request streams: yields (stream index, output) as outputs arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(streams[i].__anext__())] = i
    finally:
        for fut in pending:
            fut.cancel()
