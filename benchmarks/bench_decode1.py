"""decode-1 (../shared/WORKLOADS.md): one request, 16-token ShareGPT prompt, 256 new tokens, greedy; tokenmill
(in-process engine, bf16 weights) against llama-cpp-python (in-process `Llama`, the shipped Q4_1 GGUF, greedy,
repeat penalty off) in the same run. Decode tokens/s = (tokens - 1) / (time of last token - time of first);
median of --repeats runs each, the two engines alternating run by run. Writes benchmarks/results/<--name>.{json,png}
(default decode1_cpu).

    python benchmarks/bench_decode1.py [--repeats 7] [--threads 2] [--name decode1_cpu_amx]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from tokenmill.bench.machine import basic_machine_info, measure_bandwidth, wait_quiet  # noqa: E402
from tokenmill.bench.workloads import (  # noqa: E402
    build_workload,
    load_hf_tokenizer,
    smollm2_gguf_path,
)


def tokenmill_runner(prompt: list[int], max_tokens: int, dtype: str) -> Callable[[], dict[str, float]]:
    from tokenmill import LLM, SamplingParams

    engine = LLM(dtype=dtype, kv_cache_bytes=256 * 2**20).engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    count = iter(range(10**9))

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        engine.add_request(f"d{next(count)}", None, params, prompt_token_ids=prompt)
        stamps: list[float] = []
        seen = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                if n > seen:
                    stamps.extend([time.perf_counter()] * (n - seen))
                    seen = n
        return _run_stats(t0, stamps)

    return run


def llamacpp_runner(prompt: list[int], max_tokens: int, threads: int) -> Callable[[], dict[str, float]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=smollm2_gguf_path(), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def run() -> dict[str, float]:
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == max_tokens:
                break
        return _run_stats(t0, stamps)

    return run


def _run_stats(t0: float, stamps: list[float]) -> dict[str, float]:
    return {"ttft_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": len(stamps)}


def interleaved(runners: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, list[dict]]:
    """One run of each engine per round, alternating, after one warm-up round: both see the same machine noise."""
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for r in range(repeats + 1):
        for name, run in runners.items():
            wait_quiet()
            stats = run()
            if r:
                runs[name].append(stats)
    return runs


def summary(runs: list[dict]) -> dict[str, Any]:
    return {"runs": runs, "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
            "ttft_s": statistics.median(x["ttft_s"] for x in runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="decode1_cpu", help="output file stem")
    args = p.parse_args(argv)

    workload = build_workload("decode-1", load_hf_tokenizer())
    prompt, max_tokens = workload.prompts[0], workload.max_tokens[0]
    results: dict[str, Any] = {"benchmark": "decode-1", "machine": basic_machine_info(),
                               "workload": {"prompt_tokens": len(prompt), "max_tokens": max_tokens},
                               "bandwidth": measure_bandwidth()}
    runners = {"tokenmill": tokenmill_runner(prompt, max_tokens, args.dtype)}
    llama = llamacpp_runner(prompt, max_tokens, args.threads)
    if llama is not None:
        runners["llama-cpp-python"] = llama
    runs = interleaved(runners, args.repeats)
    results["tokenmill"] = {"dtype": args.dtype, **summary(runs["tokenmill"])}
    results["llama-cpp-python"] = (
        {"weights": "Q4_1 GGUF as shipped", "threads": args.threads, **summary(runs["llama-cpp-python"])}
        if llama is not None else {"error": "llama-cpp-python is not installed"})
    lc = results["llama-cpp-python"].get("decode_tok_s")
    if lc:
        results["ratio_tokenmill_vs_llamacpp"] = results["tokenmill"]["decode_tok_s"] / lc
    params = 134_515_008  # SmolLM2-135M (tokenmill bench roofline)
    bw = max(v for k, v in results["bandwidth"].items() if k.endswith("_gb_s")) * 1e9
    results["bf16_bandwidth_limit_tok_s"] = bw / (2 * params)

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{args.name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"tokenmill ({args.dtype})", "llama-cpp-python (Q4_1)", "bf16 bandwidth limit"]
    vals = [results["tokenmill"]["decode_tok_s"], lc or 0, results["bf16_bandwidth_limit_tok_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, vals, color=["#2a7ab9", "#d9822b", "#bbbbbb"])
    for rect, v in zip(bars, vals):
        ax.annotate(f"{v:.1f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"decode-1 on SmolLM2-135M, {results['machine']['cpu_model']}, median of {args.repeats}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=110)
    print(json.dumps({k: results[k]["decode_tok_s"] if isinstance(results[k], dict) and "decode_tok_s" in results[k]
                      else results[k] for k in ("tokenmill", "llama-cpp-python", "bf16_bandwidth_limit_tok_s")}))
    if lc:
        print(f"tokenmill / llama-cpp-python decode-1: {results['ratio_tokenmill_vs_llamacpp']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
