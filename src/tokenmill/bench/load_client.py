"""Streaming load generator for any OpenAI-compatible server (tokenmill, vLLM, llama-cpp-python, ...).

Every request is a streamed ``POST /v1/completions`` (or ``/v1/chat/completions``) read chunk by
chunk; per request it records

* TTFT: from sending the request to the first chunk that carries generated text,
* ITL: the gaps between successive text-carrying chunks (one entry per chunk, as vLLM's client),
* e2e latency: from sending the request to the end of the stream,
* TPOT: ``(e2e - ttft) / (output_tokens - 1)``,
* output tokens: ``usage.completion_tokens`` of the last chunk when the server honours
  ``stream_options.include_usage``; otherwise the generated text re-tokenised with the given
  tokenizer; otherwise the number of text-carrying chunks (``output_tokens_source`` says which).

Load is either a fixed concurrency (at most N requests in flight) or a request rate (Poisson
arrivals, or gamma with ``burstiness`` != 1; ``inf`` sends all at once), or both (rate-limited
arrivals with a concurrency cap). The run summary has completed/failed counts, duration,
request/s, output and total tok/s, mean/median/p90/p99 of TTFT, TPOT, ITL and e2e, and goodput
against SLOs on TTFT and TPOT. Results are dataclasses with ``to_dict()`` (JSON-serialisable).
The command line is ``tokenmill bench serve`` (tokenmill.bench.cli).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


# --------------------------------------------------------------------------------------------- data


@dataclass
class RequestSpec:
    """One request of a workload: the prompt (text or token ids) and how many tokens to ask for."""

    prompt: str | list[int]
    prompt_len: int
    max_tokens: int


@dataclass
class RequestResult:
    """What one streamed request measured. Times in seconds; ``start`` is relative to the run start."""

    index: int
    success: bool = False
    prompt_len: int = 0
    max_tokens: int = 0
    output_tokens: int = 0
    output_tokens_source: str = ""  # "usage" | "tokenizer" | "chunks"
    num_chunks: int = 0
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    tpot: float | None = None
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage_prompt_tokens: int | None = None
    status_code: int | None = None
    error: str = ""
    text: str = ""

    def to_dict(self, include_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not include_text:
            d.pop("text")
        return d


@dataclass
class BenchmarkResult:
    """Summary of one load run plus the per-request results."""

    base_url: str
    endpoint: str
    model: str | None
    num_requests: int
    concurrency: int | None
    request_rate: float
    burstiness: float
    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    # metric name -> {"mean", "median", "p90", "p99", "std", "min", "max"} in seconds
    ttft: dict[str, float | None]
    tpot: dict[str, float | None]
    itl: dict[str, float | None]
    e2e: dict[str, float | None]
    slo: dict[str, float | None]
    good_requests: int
    goodput: float  # good requests per second
    goodput_output_throughput: float  # output tokens per second of the good requests
    output_tokens_sources: dict[str, int]
    short_requests: int  # completed requests that got fewer tokens than max_tokens (EOS honoured)
    errors: list[str] = field(default_factory=list)
    requests: list[RequestResult] = field(default_factory=list, repr=False)

    def to_dict(self, include_requests: bool = True, include_text: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "requests"}
        if self.request_rate == math.inf:
            d["request_rate"] = "inf"  # JSON has no infinity
        if include_requests:
            d["requests"] = [r.to_dict(include_text) for r in self.requests]
        return d

    def summary_lines(self, title: str = "") -> list[str]:
        def ms(m: dict[str, float | None], k: str) -> str:
            v = m.get(k)
            return f"{1000 * v:9.1f}" if v is not None else f"{'-':>9}"

        rate = "inf" if self.request_rate == math.inf else f"{self.request_rate:g}"
        lines = [
            f"== {title or self.base_url}: {self.num_requests} requests, concurrency "
            f"{self.concurrency or 'unbounded'}, rate {rate} req/s",
            f"completed {self.completed}, failed {self.failed}, duration {self.duration:.2f} s",
            f"requests/s {self.request_throughput:.2f}, output tok/s {self.output_throughput:.1f}, "
            f"total tok/s {self.total_token_throughput:.1f} ({self.total_input_tokens} in, "
            f"{self.total_output_tokens} out)",
            f"{'':6} {'mean ms':>9} {'median':>9} {'p90':>9} {'p99':>9}",
        ]
        for name in ("ttft", "tpot", "itl", "e2e"):
            m = getattr(self, name)
            lines.append(f"{name.upper():6} {ms(m, 'mean')} {ms(m, 'median')} {ms(m, 'p90')} {ms(m, 'p99')}")
        if any(v is not None for v in self.slo.values()):
            slo = ", ".join(f"{k} <= {1000 * v:.0f} ms" for k, v in self.slo.items() if v is not None)
            lines.append(f"goodput ({slo}): {self.good_requests}/{self.completed} requests, "
                         f"{self.goodput:.2f} req/s, {self.goodput_output_throughput:.1f} output tok/s")
        if self.short_requests:
            lines.append(f"note: {self.short_requests} requests stopped before max_tokens (EOS not ignored?)")
        return lines


# --------------------------------------------------------------------------------------------- stats


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90, p99, std, min, max (linear-interpolated percentiles); None when empty."""
    keys = ("mean", "median", "p90", "p99", "std", "min", "max")
    if not values:
        return {k: None for k in keys}
    xs = sorted(float(v) for v in values)
    n = len(xs)
    mean = sum(xs) / n

    def pct(q: float) -> float:
        pos = (n - 1) * q / 100.0
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
    return {"mean": mean, "median": pct(50), "p90": pct(90), "p99": pct(99), "std": std, "min": xs[0],
            "max": xs[-1]}


def _count_tokens_fn(tokenizer: Any) -> Callable[[str], int] | None:
    if tokenizer is None:
        return None
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer(text))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------------------------- client


async def _arrivals(n: int, request_rate: float, burstiness: float, rng: random.Random):
    """Yield request indices 0..n-1, sleeping between them for the given arrival process."""
    for i in range(n):
        yield i
        if request_rate == math.inf or i == n - 1:
            continue
        if burstiness == 1.0:
            gap = rng.expovariate(request_rate)
        else:  # gamma with mean 1/rate; shape < 1 is burstier than Poisson, > 1 smoother
            gap = rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
        await asyncio.sleep(gap)


def _build_payload(spec: RequestSpec, endpoint: str, model: str | None, base: dict[str, Any],
                   min_tokens: bool) -> dict[str, Any]:
    payload = dict(base)
    if model:
        payload["model"] = model
    if endpoint == CHAT_COMPLETIONS:
        if not isinstance(spec.prompt, str):
            raise ValueError("the chat endpoint needs text prompts")
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    payload["max_tokens"] = spec.max_tokens
    if min_tokens:
        payload["min_tokens"] = spec.max_tokens
    return payload


async def _send(client: Any, url: str, payload: dict[str, Any], headers: dict[str, str], res: RequestResult,
                t_run0: float, count_tokens: Callable[[str], int] | None) -> None:
    chat = url.endswith(CHAT_COMPLETIONS)
    pieces: list[str] = []
    usage_tokens: int | None = None
    last = None
    t0 = time.perf_counter()
    res.start = t0 - t_run0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            res.status_code = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (": ping"), event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    res.error = f"bad stream chunk: {data[:200]}"
                    return
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    err = chunk["error"]
                    res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        res.usage_prompt_tokens = int(usage["prompt_tokens"])
                for choice in chunk.get("choices") or ():
                    if choice.get("index", 0) != 0:
                        continue
                    if chat:
                        text = (choice.get("delta") or {}).get("content") or ""
                    else:
                        text = choice.get("text") or ""
                    fr = choice.get("finish_reason")
                    if fr:
                        res.finish_reason = fr
                    # a chunk is a token event when it carries text: not the role-only first chat delta,
                    # not an empty closing chunk (llama-cpp-python), not a held-back partial character
                    if not text:
                        continue
                    pieces.append(text)
                    res.num_chunks += 1
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        end = time.perf_counter()
    except Exception as e:  # connection refused/reset, timeouts, protocol errors
        res.error = f"{type(e).__name__}: {e}"[:400]
        return
    res.text = "".join(pieces)
    res.e2e = end - t0
    if usage_tokens is not None:
        res.output_tokens, res.output_tokens_source = usage_tokens, "usage"
    elif count_tokens is not None:
        res.output_tokens, res.output_tokens_source = count_tokens(res.text), "tokenizer"
    else:
        res.output_tokens, res.output_tokens_source = res.num_chunks, "chunks"
    if res.ttft is None:
        res.error = "stream ended without any generated text"
        return
    if res.output_tokens > 1:
        res.tpot = (res.e2e - res.ttft) / (res.output_tokens - 1)
    res.success = True


async def arun_benchmark(
    base_url: str,
    requests: Sequence[RequestSpec],
    *,
    model: str | None = None,
    endpoint: str = COMPLETIONS,
    concurrency: int | None = None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    ignore_eos: bool = True,
    min_tokens: bool = False,
    include_usage: bool = True,
    temperature: float = 0.0,
    extra_body: dict[str, Any] | None = None,
    api_key: str | None = None,
    tokenizer: Any = None,
    timeout: float = 600.0,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
    slo_e2e: float | None = None,
    progress: bool = True,
    seed: int = 0,
    use_response_cache: bool = False,
) -> BenchmarkResult:
    """Run the requests against ``base_url`` and measure them (see the module docstring).

    ``concurrency``: at most this many requests in flight (None: unbounded). ``request_rate``:
    arrivals per second (inf: all at once). ``ignore_eos`` sends the non-standard field that
    tokenmill and vLLM honour; ``min_tokens`` asks for ``min_tokens = max_tokens`` (llama-cpp-python).
    ``tokenizer`` (HF tokenizer or ``text -> ids`` callable) counts output tokens when the server does
    not report usage in the stream. ``slo_ttft`` / ``slo_tpot`` / ``slo_e2e`` in seconds define goodput: a good
    request meets every SLO given.
    Requests carry ``Cache-Control: no-store`` so that a server's response cache cannot answer repeated greedy
    prompts, unless ``use_response_cache``.
    """
    import httpx

    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not (request_rate > 0):
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    url = base_url.rstrip("/") + endpoint
    base: dict[str, Any] = {"stream": True, "temperature": temperature}
    if include_usage:
        base["stream_options"] = {"include_usage": True}
    if ignore_eos:
        base["ignore_eos"] = True
    if extra_body:
        base.update(extra_body)
    headers = {} if use_response_cache else {"Cache-Control": "no-store"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    count_tokens = _count_tokens_fn(tokenizer)
    n = len(requests)
    results = [RequestResult(index=i, prompt_len=s.prompt_len, max_tokens=s.max_tokens)
               for i, s in enumerate(requests)]
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    max_conn = max(1, min(concurrency or n, n))
    limits = httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=n, desc=f"requests -> {base_url}", unit="req", leave=False)
    rng = random.Random(seed)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:

        async def one(i: int) -> None:
            payload = _build_payload(requests[i], endpoint, model, base, min_tokens)
            if sem is None:
                await _send(client, url, payload, headers, results[i], t_run0, count_tokens)
            else:
                async with sem:
                    await _send(client, url, payload, headers, results[i], t_run0, count_tokens)
            if pbar is not None:
                pbar.update(1)

        t_run0 = time.perf_counter()
        tasks = []
        async for i in _arrivals(n, request_rate, burstiness, rng):
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_run0
    if pbar is not None:
        pbar.close()
    return summarize(results, duration, base_url=base_url, endpoint=endpoint, model=model,
                     concurrency=concurrency, request_rate=request_rate, burstiness=burstiness,
                     slo_ttft=slo_ttft, slo_tpot=slo_tpot, slo_e2e=slo_e2e)


def summarize(results: list[RequestResult], duration: float, *, base_url: str = "", endpoint: str = COMPLETIONS,
              model: str | None = None, concurrency: int | None = None, request_rate: float = math.inf,
              burstiness: float = 1.0, slo_ttft: float | None = None,
              slo_tpot: float | None = None, slo_e2e: float | None = None) -> BenchmarkResult:
    """Aggregate per-request results of a run that took ``duration`` seconds."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_len for r in ok)

    def good(r: RequestResult) -> bool:
        if slo_ttft is not None and (r.ttft is None or r.ttft > slo_ttft):
            return False
        if slo_tpot is not None and r.tpot is not None and r.tpot > slo_tpot:
            return False
        if slo_e2e is not None and (r.e2e is None or r.e2e > slo_e2e):
            return False
        return True

    good_reqs = [r for r in ok if good(r)]
    sources: dict[str, int] = {}
    for r in ok:
        sources[r.output_tokens_source] = sources.get(r.output_tokens_source, 0) + 1
    errors = sorted({r.error for r in results if r.error})[:10]
    d = duration if duration > 0 else float("nan")
    return BenchmarkResult(
        base_url=base_url,
        endpoint=endpoint,
        model=model,
        num_requests=len(results),
        concurrency=concurrency,
        request_rate=request_rate,
        burstiness=burstiness,
        completed=len(ok),
        failed=len(results) - len(ok),
        duration=duration,
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        request_throughput=len(ok) / d,
        output_throughput=out_tokens / d,
        total_token_throughput=(in_tokens + out_tokens) / d,
        ttft=stats([r.ttft for r in ok if r.ttft is not None]),
        tpot=stats([r.tpot for r in ok if r.tpot is not None]),
        itl=stats([x for r in ok for x in r.itl]),
        e2e=stats([r.e2e for r in ok if r.e2e is not None]),
        slo={"ttft": slo_ttft, "tpot": slo_tpot, "e2e": slo_e2e},
        good_requests=len(good_reqs),
        goodput=len(good_reqs) / d,
        goodput_output_throughput=sum(r.output_tokens for r in good_reqs) / d,
        output_tokens_sources=sources,
        short_requests=sum(1 for r in ok if r.output_tokens < r.max_tokens),
        errors=errors,
        requests=results,
    )


def run_benchmark(base_url: str, requests: Sequence[RequestSpec], **kwargs: Any) -> BenchmarkResult:
    """Synchronous wrapper of :func:`arun_benchmark` (runs its own event loop)."""
    return asyncio.run(arun_benchmark(base_url, requests, **kwargs))


# --------------------------------------------------------------------------------------------- helpers


def get_json(base_url: str, path: str, timeout: float = 10.0, api_key: str | None = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + path, timeout=timeout, headers=headers)
    r.raise_for_status()
    return r.json()


def served_model_id(base_url: str, api_key: str | None = None) -> str | None:
    """The first model id of ``GET /v1/models`` (None if the server does not say)."""
    try:
        data = get_json(base_url, "/v1/models", api_key=api_key).get("data") or []
    except Exception:
        logger.debug("GET /v1/models failed", exc_info=True)
        return None
    return data[0].get("id") if data else None


def wait_for_server(base_url: str, path: str = "/health", timeout: float = 300.0, proc: Any = None,
                    interval: float = 0.5, api_key: str | None = None) -> float:
    """Poll ``GET base_url+path`` until it answers 200; returns the seconds waited.

    A server without ``path`` (404, e.g. llama-cpp-python has no /health) is polled on ``/v1/models`` instead.
    Connection errors and 503 (still loading) keep it waiting. ``proc`` (a ``subprocess.Popen``): fail at once if
    it exits. Raises TimeoutError / RuntimeError.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + path
    t0 = time.perf_counter()
    said = False
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before {url} was ready")
        try:
            status: int | str = httpx.get(url, timeout=5.0, headers=headers).status_code
            if status == 200:
                return time.perf_counter() - t0
            if status == 404 and path != "/v1/models":
                path = "/v1/models"
                url = base_url.rstrip("/") + path
                continue
        except httpx.HTTPError as e:
            status = type(e).__name__
        if not said:  # a mistyped URL waits out the timeout: say what is being waited for
            logger.info("waiting up to %.0f s for %s to answer 200 (now: %s)", timeout, url, status)
            said = True
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(interval)


def prompts_to_requests(prompts: Sequence[list[int]], max_tokens: int | Sequence[int],
                        tokenizer: Any = None) -> list[RequestSpec]:
    """Token-id prompts as requests (``max_tokens``: one for all or one per prompt); with ``tokenizer`` the
    prompts are sent as decoded text."""
    per_request = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(per_request) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(per_request)} max_tokens")
    specs = []
    for ids, n in zip(prompts, per_request):
        prompt: str | list[int] = tokenizer.decode(ids) if tokenizer is not None else list(ids)
        specs.append(RequestSpec(prompt=prompt, prompt_len=len(ids), max_tokens=n))
    return specs
