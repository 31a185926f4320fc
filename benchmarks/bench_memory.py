"""Resident memory of `tokenmill serve` as it serves many different conversations, in its default configuration.

The online benchmark turns the prefix cache off (repeated runs of the same prompts would otherwise hit it); a
user's server runs with it on. This script starts `tokenmill serve --dtype bfloat16` (prefix caching on) and sends
it rounds of sharegpt-128-sized batches of *distinct* ShareGPT prompts (128 new prompts per round, 128 tokens each,
concurrency 16, streaming HTTP), and records the server's resident memory (its process tree: the HTTP process and
the engine process) after start-up and after each round. Configurations, one server each:

* default: the prefix cache keeps at most 256 MiB of KV for finished requests (CPU default);
* unbounded: ``--prefix-cache-bytes`` of the whole 4 GiB KV budget (how the cache behaved before the bound);
* off: ``--no-prefix-caching``.

Writes benchmarks/results/memory_cpu.json and .png.

    python benchmarks/bench_memory.py [--rounds 4] [--name memory_cpu] [--before OLD.json LABEL]

`--before` embeds a run of this script made on another checkout (for memory_cpu.*: commit c1a4347, a worktree
whose copy of this script ran with PYTHONPATH pointing at its src and `--configs default,off`) and plots it dashed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from bench_online import ServerProcess, free_port  # noqa: E402  (benchmarks/ is this script's directory)

from tokenmill.bench import load_client  # noqa: E402
from tokenmill.bench.machine import basic_machine_info, process_tree_peak_rss_mb  # noqa: E402
from tokenmill.bench.workloads import encode_fn, load_hf_tokenizer, sharegpt_prompts  # noqa: E402

logger = logging.getLogger("bench_memory")

CONFIGS = {
    "default": [],
    "unbounded": ["--prefix-cache-bytes", str(4 * 2**30)],
    "off": ["--no-prefix-caching"],
}


def tree_rss_mb(pids: list[int]) -> float:
    """Current resident memory (VmRSS) of the processes and their descendants, in MiB."""
    import psutil

    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def run_config(name: str, extra: list[str], rounds: list[list[list[int]]], args: argparse.Namespace,
               log_dir: str) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", *extra]
    with ServerProcess(name, cmd, port, "/health", log_dir) as server:
        startup = server.start(timeout=300)
        points = [{"round": 0, "rss_mb": tree_rss_mb(server.pids()),
                   "peak_rss_mb": process_tree_peak_rss_mb(server.pids())}]
        for i, prompts in enumerate(rounds, 1):
            specs = load_client.prompts_to_requests(prompts, args.max_tokens)
            res = load_client.run_benchmark(server.base_url, specs, concurrency=args.concurrency, ignore_eos=True,
                                            progress=False)
            if res.failed:
                raise RuntimeError(f"[{name}] round {i}: {res.failed} requests failed: {res.errors[:3]}")
            points.append({"round": i, "rss_mb": tree_rss_mb(server.pids()),
                           "peak_rss_mb": process_tree_peak_rss_mb(server.pids()),
                           "output_tok_s": res.output_throughput})
            logger.info("[%s] round %d: RSS %.0f MiB (peak %.0f), %.1f tok/s", name, i, points[-1]["rss_mb"],
                        points[-1]["peak_rss_mb"], res.output_throughput)
    return {"args": extra, "startup_s": startup, "points": points}


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results["configs"].items():
        xs = [p["round"] for p in r["points"]]
        ax.plot(xs, [p["peak_rss_mb"] for p in r["points"]], marker="o", label=f"{name} {' '.join(r['args'])}")
    before = results.get("before")
    for name, r in (before or {}).get("configs", {}).items():
        xs = [p["round"] for p in r["points"]]
        ax.plot(xs, [p["peak_rss_mb"] for p in r["points"]], marker="x", linestyle=":",
                label=f"{before['label']}: {name} {' '.join(r['args'])}")
    ax.axhline(2048, color="grey", linestyle="--", linewidth=1, label="2 GiB target")
    ax.set_xlabel(f"rounds of {results['prompts_per_round']} new ShareGPT prompts (c={results['concurrency']})")
    ax.set_ylabel("peak RSS of the server (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"tokenmill serve, SmolLM2-135M bf16, {results['machine']['cpu_model']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prompts-per-round", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--name", default="memory_cpu")
    p.add_argument("--before", nargs=2, metavar=("JSON", "LABEL"),
                   help="another run of this script (e.g. an older commit) to include and plot dashed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    n = args.prompts_per_round
    prompts = sharegpt_prompts(encode_fn(load_hf_tokenizer()), num=n * args.rounds)
    rounds = [prompts[i * n : (i + 1) * n] for i in range(args.rounds)]
    results: dict[str, Any] = {
        "benchmark": "memory", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": basic_machine_info(),
        "workload": "distinct sharegpt prompts per round, greedy, ignore_eos, streaming /v1/completions",
        "prompts_per_round": n, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
        "rss": "process tree (HTTP + engine processes); peak = sum of each process's VmHWM", "configs": {},
    }
    if args.before:
        with open(args.before[0]) as f:
            results["before"] = {"label": args.before[1], "configs": json.load(f)["configs"]}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as log_dir:
        for name in args.configs.split(","):
            results["configs"][name] = run_config(name, CONFIGS[name], rounds, args, log_dir)
    out = os.path.join(ROOT, "benchmarks", "results", args.name)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, out + ".png")
    for name, r in results["configs"].items():
        peaks = ", ".join(f"{pt['peak_rss_mb']:.0f}" for pt in r["points"])
        print(f"{name:10s} peak RSS MiB after start-up and each round: {peaks}")
    print(f"wrote {out}.json / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
