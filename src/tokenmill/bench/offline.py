"""A workload through the in-process engine (``tokenmill.LLM``): throughput, TTFT and decode speed.

All requests are submitted at once as token ids with ``SamplingParams(max_tokens=n, ignore_eos=True,
temperature=0)``; TTFT, queue and decode times come from each ``RequestOutput.metrics``. The command
line is ``tokenmill bench offline`` (tokenmill.bench.cli).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from .load_client import stats
from .workloads import Workload

logger = logging.getLogger(__name__)


def greedy_params(max_tokens: int) -> Any:
    from tokenmill import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


def warm_up(llm: Any, workload: Workload, num: int = 4, max_tokens: int = 4) -> None:
    """A few short requests (the workload's first prompts) so that the timed run pays no first-use costs."""
    prompts = workload.prompts[:num]
    if prompts:
        llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)


def run_offline(llm: Any, workload: Workload, progress: bool = False,
                keep_outputs: bool = False) -> dict[str, Any]:
    """One timed run of ``workload`` through ``llm.generate`` (all requests at once).

    Returns duration, request/output/total token throughput, TTFT / queue-time / per-request decode
    tokens/s statistics (seconds; see load_client.stats), and per-request results. ``keep_outputs``
    adds the generated token ids under ``"outputs"``.
    """
    params = [greedy_params(n) for n in workload.max_tokens]
    t0 = time.perf_counter()
    outs = llm.generate(workload.prompts, params, use_tqdm=progress)
    duration = time.perf_counter() - t0
    per_request = []
    for out, wanted in zip(outs, workload.max_tokens):
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        decode = m.decode_time
        per_request.append({
            "prompt_len": len(out.prompt_token_ids),
            "max_tokens": wanted,
            "output_tokens": n,
            "ttft": m.ttft,
            "queue_time": m.queue_time,
            "decode_time": decode,
            # tokens after the first over the time after the first
            "decode_tok_s": (n - 1) / decode if decode and n > 1 else None,
            "cached_tokens": getattr(out, "num_cached_tokens", 0) or 0,
            "finish_reason": out.outputs[0].finish_reason,
        })
    out_tokens = sum(r["output_tokens"] for r in per_request)
    in_tokens = sum(r["prompt_len"] for r in per_request)
    short = sum(1 for r in per_request if r["output_tokens"] < r["max_tokens"])
    if short:
        logger.warning("%d requests returned fewer tokens than asked for", short)
    d = duration if duration > 0 else float("nan")
    res: dict[str, Any] = {
        "num_requests": len(outs),
        "duration": duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in per_request),
        "requests_s": len(outs) / d,
        "output_tok_s": out_tokens / d,
        "total_tok_s": (in_tokens + out_tokens) / d,
        "ttft": stats([r["ttft"] for r in per_request if r["ttft"] is not None]),
        "queue_time": stats([r["queue_time"] for r in per_request if r["queue_time"] is not None]),
        "decode_tok_s": stats([r["decode_tok_s"] for r in per_request if r["decode_tok_s"] is not None]),
        "short_requests": short,
        "requests": per_request,
    }
    if keep_outputs:
        res["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
    return res
