"""Serving patterns on SmolLM2-135M on this CPU, each measured side by side in one run:

1. Response cache on a repeated-questions workload: --num-distinct ShareGPT prompts (sharegpt-128's selection),
   each asked twice, the repeats after the first asks (in shuffled order); greedy, --max-tokens tokens, EOS ignored,
   concurrency --concurrency, one server. Run once with the cache bypassed (Cache-Control: no-store) and once
   using it. Reported: output tokens/s delivered to clients, median and p99 end-to-end latency, hit rate, median
   latency of hits vs misses.
2. Fallback under overload: a flood of --flood requests at once to a model with a small queue (max_num_seqs 4,
   max_queued_requests 4). Server A: the model alone; server B: the same model with a fallback (SmolLM2 with int8
   weights) in the same process. Reported: requests answered / refused (429), and who answered them.
3. Overheads per request of routing (rule match + difficulty score on ShareGPT prompts) and of one monitor
   sample, in microseconds.

Writes benchmarks/results/serving_patterns_cpu.{json,png}.

    python benchmarks/bench_serving_patterns.py [--num-distinct 32] [--max-tokens 64] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

import httpx  # noqa: E402

from tokenmill.bench.load_client import prompts_to_requests, run_benchmark, wait_for_server  # noqa: E402
from tokenmill.bench.machine import basic_machine_info  # noqa: E402
from tokenmill.bench.workloads import encode_fn, first_human_turns, load_hf_tokenizer, sharegpt_prompts  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_server(self.url, timeout=600, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        os.unlink(self.log.name)


def bench_cache(tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    prompts = sharegpt_prompts(encode_fn(tok), num=args.num_distinct)
    rng = random.Random(0)
    first = list(range(len(prompts)))
    rng.shuffle(first)
    repeats = list(first)
    rng.shuffle(repeats)
    order = first + repeats
    requests = prompts_to_requests([prompts[i] for i in order], args.max_tokens)
    srv = Server("--dtype", "bfloat16")
    try:
        out = {}
        for name, use in (("cache_bypassed", False), ("cache_on", True)):
            res = run_benchmark(srv.url, requests, concurrency=args.concurrency, use_response_cache=use,
                                progress=False)
            reqs = sorted(res.requests, key=lambda r: r.index)
            firsts = [r.e2e for r in reqs[:len(first)] if r.success]
            repeated = [r.e2e for r in reqs[len(first):] if r.success]
            out[name] = {
                "completed": res.completed, "failed": res.failed, "duration_s": res.duration,
                "output_tokens_per_s": res.output_throughput,
                "e2e_median_s": res.e2e["median"], "e2e_p99_s": res.e2e["p99"], "ttft_median_s": res.ttft["median"],
                "first_asks_e2e_median_s": statistics.median(firsts),
                "repeats_e2e_median_s": statistics.median(repeated),
            }
        metrics = httpx.get(srv.url + "/metrics").text
        for line in metrics.splitlines():
            if line.startswith("tokenmill:response_cache_hits_total"):
                out["cache_on"]["hits"] = float(line.split()[-1])
            if line.startswith("tokenmill:response_cache_misses_total"):
                out["cache_on"]["misses"] = float(line.split()[-1])
        out["speedup_tokens_per_s"] = out["cache_on"]["output_tokens_per_s"] / out["cache_bypassed"]["output_tokens_per_s"]
        out["workload"] = {"distinct_prompts": len(prompts), "requests": len(order), "max_tokens": args.max_tokens,
                           "concurrency": args.concurrency, "sampling": "greedy, ignore_eos"}
        return out
    finally:
        srv.stop()


def bench_fallback(tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    prompts = sharegpt_prompts(encode_fn(tok), num=args.flood)
    body_base = {"max_tokens": 32, "ignore_eos": True, "temperature": 0.7}
    primary = {"name": "primary", "max_queued_requests": 4, "engine": {"dtype": "bfloat16", "max_num_seqs": 4}}
    cfg_alone = {"models": [primary]}
    cfg_fb = {"models": [{**primary, "fallback": "backup"},
                         {"name": "backup", "max_queued_requests": 256,
                          "engine": {"dtype": "bfloat16", "quantization": "int8", "max_num_seqs": 64}}]}
    out: dict[str, Any] = {}
    for name, cfg in (("alone", cfg_alone), ("with_fallback", cfg_fb)):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(cfg, f)
        srv = Server("--config", f.name, "--response-cache", "off")
        try:
            import asyncio

            async def flood():
                async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.flood)) as c:
                    return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json={
                        "model": "primary", "prompt": tok.decode(p), **body_base}) for p in prompts))

            t0 = time.perf_counter()
            results = asyncio.run(flood())
            dt = time.perf_counter() - t0
            served: dict[str, int] = {}
            for r in results:
                if r.status_code == 200:
                    served[r.json()["model"]] = served.get(r.json()["model"], 0) + 1
            out[name] = {"requests": len(results), "answered": sum(served.values()),
                         "refused_429": sum(r.status_code == 429 for r in results),
                         "other_errors": sum(r.status_code not in (200, 429) for r in results),
                         "answered_by": served, "duration_s": dt}
        finally:
            srv.stop()
            os.unlink(f.name)
    return out


def bench_overheads(tok: Any) -> dict[str, Any]:
    from tokenmill.serving.routing import RequestFeatures, RouteRule, RouterConfig, difficulty_score

    texts = [t for _, t in zip(range(500), first_human_turns())]
    router = RouterConfig(default="small", rules=[
        RouteRule(model="large", header={"x-tier": "premium"}), RouteRule(model="large", metadata={"task": "code"}),
        RouteRule(model="large", min_prompt_tokens=1024), RouteRule(model="large", min_difficulty=0.5)])
    t0 = time.perf_counter()
    lengths = [len(tok.encode(t, add_special_tokens=False)) for t in texts]
    t1 = time.perf_counter()
    routed = {"small": 0, "large": 0}
    for t, n in zip(texts, lengths):
        model, _ = router.route(RequestFeatures(n, 128, {}, {}, difficulty_score(t, n)))
        routed[model] += 1
    t2 = time.perf_counter()
    return {"tokenize_us_per_request": (t1 - t0) / len(texts) * 1e6,
            "score_and_rules_us_per_request": (t2 - t1) / len(texts) * 1e6,
            "mean_prompt_tokens": sum(lengths) / len(lengths), "routed_by_rules": routed, "prompts": len(texts)}


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    c = results["cache"]
    names = ["cache bypassed", "cache on"]
    axes[0].bar(names, [c["cache_bypassed"]["output_tokens_per_s"], c["cache_on"]["output_tokens_per_s"]],
                color=["#888", "#2a7"])
    axes[0].set_ylabel("output tokens/s delivered")
    axes[0].set_title(f"repeated questions ({c['workload']['requests']} req, c={c['workload']['concurrency']})")
    axes[1].bar(["bypassed\nfirst asks", "bypassed\nrepeats", "cache on\nfirst asks", "cache on\nrepeats"],
                [c["cache_bypassed"]["first_asks_e2e_median_s"], c["cache_bypassed"]["repeats_e2e_median_s"],
                 c["cache_on"]["first_asks_e2e_median_s"], c["cache_on"]["repeats_e2e_median_s"]],
                color=["#888", "#888", "#2a7", "#2a7"])
    axes[1].set_ylabel("median end-to-end latency (s)")
    axes[1].set_title("latency: first asks vs repeats")
    f = results["fallback"]
    labels = ["alone", "with fallback"]
    answered = [f["alone"]["answered"], f["with_fallback"]["answered"]]
    refused = [f["alone"]["refused_429"], f["with_fallback"]["refused_429"]]
    axes[2].bar(labels, answered, color="#2a7", label="answered")
    axes[2].bar(labels, refused, bottom=answered, color="#c33", label="refused (429)")
    axes[2].set_title(f"flood of {f['alone']['requests']} requests, queue bound 4")
    axes[2].legend()
    fig.suptitle("tokenmill serving patterns, SmolLM2-135M, " + results["machine"].get("cpu_model", "CPU"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-distinct", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--flood", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serving_patterns_cpu"))
    args = ap.parse_args()
    tok = load_hf_tokenizer()
    results: dict[str, Any] = {"machine": basic_machine_info(), "model": "SmolLM2-135M-Instruct (embedded GGUF)"}
    results["overheads"] = bench_overheads(tok)
    print(json.dumps(results["overheads"], indent=1))
    results["cache"] = bench_cache(tok, args)
    print(json.dumps(results["cache"], indent=1))
    results["fallback"] = bench_fallback(tok, args)
    print(json.dumps(results["fallback"], indent=1))
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out + ".png")
    print("wrote", args.out + ".json", args.out + ".png")


if __name__ == "__main__":
    main()
