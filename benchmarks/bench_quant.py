"""Quality and speed of each weight / KV-cache mode on SmolLM2-135M (issue 5), all in one run.

Modes: bf16 (the default), int8, int4-rtn (group 32, quantised at load), int4-awq and mixed (written once by
`tokenmill quantize` with --calibration-samples ShareGPT samples), the two int4 modes again with group 64 (SmolLM2's
shipped weights are Q4_1 blocks of 32, so group 32 lands on their grid and group 64 does not: the g64 pair shows
what AWQ does when rounding really loses), gguf (the file's own Q4_1/Q8_0 blocks), and bf16 weights with an int8
KV cache. For each:
* weight bytes (stored format) and KV bytes per token; KV blocks admitted by the same budget;
* perplexity on a fixed held-out slice of ShareGPT: the first 512 tokens of the first --ppl-samples
  conversations (with >= 64 tokens) from conversation 5000 on (tokenmill.quant.calibration; calibration reads
  conversations 1000-3000), scored through the engine's prompt logprobs with chunked prefill (chunks of 128
  tokens, so attention reads the cached, possibly int8, KV of earlier chunks);
* greedy agreement with bf16: 32 sharegpt-128 prompts x 64 tokens, the fraction of tokens before the first
  difference and the fraction of equal positions;
* decode-1 tokens/s (median of --repeats) and sharegpt-128 offline output tokens/s.
Writes benchmarks/results/quant_cpu.{json,png}.

    python benchmarks/bench_quant.py [--ppl-samples 32] [--calibration-samples 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from tokenmill.bench.machine import basic_machine_info, set_wait_quiet_default, wait_quiet  # noqa: E402
from tokenmill.bench.offline import run_offline, warm_up  # noqa: E402
from tokenmill.bench.workloads import build_workload, load_hf_tokenizer  # noqa: E402

KV_BUDGET = 64 * 2**20


def perplexity(llm: Any, samples: list[list[int]]) -> float:
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outs = llm.generate([{"prompt_token_ids": s} for s in samples], params, use_tqdm=False)
    nll, n = 0.0, 0
    for out, ids in zip(outs, samples):
        for tok, lp in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= lp[tok]
            n += 1
    return math.exp(nll / n)


def greedy(llm: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    from tokenmill import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=n, ignore_eos=True, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(a: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    prefix, equal = [], []
    for s, r in zip(a, ref):
        first = next((i for i, (x, y) in enumerate(zip(s, r)) if x != y), len(r))
        prefix.append(first / len(r))
        equal.append(sum(x == y for x, y in zip(s, r)) / len(r))
    return {"prefix_fraction": statistics.mean(prefix), "position_fraction": statistics.mean(equal),
            "identical_outputs": sum(p == 1.0 for p in prefix)}


def decode1(llm: Any, prompt: list[int], tokens: int, repeats: int) -> float:
    from tokenmill import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    speeds = []
    for r in range(repeats + 1):
        wait_quiet()
        engine.add_request(f"d1-{r}-{time.time()}", None, params, prompt_token_ids=prompt)
        stamps: list[float] = []
        seen = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                k = len(out.outputs[0].token_ids)
                if k > seen:
                    stamps.extend([time.perf_counter()] * (k - seen))
                    seen = k
        if r:  # the first run warms up
            speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(speeds)


def run_mode(name: str, kwargs: dict, ppl_samples, agree_prompts, ref_tokens, d1_prompt, workload, args) -> dict:
    from tokenmill import LLM

    llm = LLM(dtype="bfloat16", kv_cache_bytes=KV_BUDGET, max_num_batched_tokens=128, enable_prefix_caching=False,
              **kwargs)
    e = llm.engine
    res: dict[str, Any] = {
        "mode": name,
        "engine_kwargs": kwargs,
        "weight_bytes": e.weight_bytes,
        "kv_bytes_per_token": e.runner.block_bytes(1),
        "kv_blocks_in_budget": e.block_manager.num_blocks,
    }
    res["perplexity"] = perplexity(llm, ppl_samples)
    toks = greedy(llm, agree_prompts, args.agree_tokens)
    res["greedy"] = toks
    if ref_tokens is not None:
        res["agreement"] = agreement(toks, ref_tokens)
    res["decode1_tok_s"] = decode1(llm, d1_prompt, args.decode_tokens, args.repeats)
    del llm
    gc.collect()
    # throughput with the serving defaults (prefix caching on, 512-token budget)
    llm = LLM(dtype="bfloat16", **kwargs)
    warm_up(llm, workload)
    wait_quiet()
    off = run_offline(llm, workload)
    res["sharegpt128_output_tok_s"] = off["output_tok_s"]
    res["sharegpt128_duration_s"] = off["duration"]
    del llm
    gc.collect()
    print(f"{name:10s} ppl {res['perplexity']:.3f}  weights {res['weight_bytes']['total'] / 2**20:.1f} MiB  "
          f"kv/token {res['kv_bytes_per_token']}  decode-1 {res['decode1_tok_s']:.1f} tok/s  "
          f"sharegpt-128 {res['sharegpt128_output_tok_s']:.1f} tok/s"
          + (f"  agreement {res['agreement']['prefix_fraction']:.2f}" if "agreement" in res else ""), flush=True)
    return res


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m["mode"] for m in result["modes"]]
    base = result["modes"][0]
    panels = [
        ("weight bytes (x bf16)", [m["weight_bytes"]["total"] / base["weight_bytes"]["total"] for m in result["modes"]]),
        ("perplexity (held-out ShareGPT)", [m["perplexity"] for m in result["modes"]]),
        ("decode-1 tok/s", [m["decode1_tok_s"] for m in result["modes"]]),
        ("sharegpt-128 offline tok/s", [m["sharegpt128_output_tok_s"] for m in result["modes"]]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(modes, vals, color=["#555"] + ["#3a7"] * (len(modes) - 1))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}" if v < 10 else f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("SmolLM2-135M weight / KV modes on " + result["machine"].get("cpu_model", "CPU"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-samples", type=int, default=32)
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--agree-prompts", type=int, default=32)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="bf16,int8,int4-rtn,int4-awq,int4-rtn-g64,int4-awq-g64,mixed,gguf,kv-int8")
    ap.add_argument("--wait-quiet", type=float, default=60.0,
                    help="before each timed run wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quant_cpu"))
    args = ap.parse_args()
    set_wait_quiet_default(args.wait_quiet)

    from tokenmill.model.paths import resolve_model_path
    from tokenmill.quant.calibration import heldout_samples
    from tokenmill.quant.quantize import quantize_checkpoint

    tok = load_hf_tokenizer()
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    ppl_samples = [s.tolist() for s in heldout_samples(encode, args.ppl_samples, 512)]
    workload = build_workload("sharegpt", tok)
    agree_prompts = workload.prompts[: args.agree_prompts]
    d1_prompt = build_workload("decode-1", tok).prompts[0]

    tmp = tempfile.mkdtemp(prefix="tokenmill-quant-")
    quantize_s = {}
    modes: list[tuple[str, dict]] = []
    for name in args.modes.split(","):
        if name == "bf16":
            modes.append((name, {}))
        elif name == "int8":
            modes.append((name, {"quantization": "int8"}))
        elif name in ("int4-rtn", "int4-rtn-g64"):
            group = 64 if name.endswith("g64") else 32
            policy = os.path.join(tmp, f"{name}.json")
            with open(policy, "w") as f:
                json.dump({"name": name, "default": "int4", "group_size": group}, f)
            modes.append((name, {"quantization": policy}))
        elif name in ("int4-awq", "int4-awq-g64", "mixed"):
            out = os.path.join(tmp, name)
            t0 = time.perf_counter()
            quantize_checkpoint(None, name.removesuffix("-g64"), out, 64 if name.endswith("g64") else None,
                                calibration_samples_n=args.calibration_samples)
            quantize_s[name] = time.perf_counter() - t0
            modes.append((name, {"model": out}))
        elif name == "gguf":
            modes.append((name, {"quantization": "gguf"}))
        elif name == "kv-int8":
            modes.append((name, {"kv_cache_dtype": "int8"}))
        else:
            raise SystemExit(f"unknown mode {name}")

    result: dict[str, Any] = {
        "benchmark": "quantisation quality and speed",
        "model": os.path.basename(resolve_model_path(None)),
        "machine": basic_machine_info(),
        "config": vars(args),
        "heldout": {"samples": len(ppl_samples), "tokens": sum(len(s) for s in ppl_samples),
                    "definition": "ShareGPT V3 conversations from index 5000, first 512 tokens of each with >= 64"},
        "quantize_seconds": quantize_s,
        "modes": [],
    }
    ref = None
    for name, kwargs in modes:
        r = run_mode(name, kwargs, ppl_samples, agree_prompts, ref, d1_prompt, workload, args)
        if ref is None:
            ref = r["greedy"]
        result["modes"].append(r)
    base = result["modes"][0]
    by = {m["mode"]: m for m in result["modes"]}
    summary = {}
    for m in result["modes"]:
        summary[m["mode"]] = {
            "weight_bytes_ratio": m["weight_bytes"]["total"] / base["weight_bytes"]["total"],
            "perplexity_ratio": m["perplexity"] / base["perplexity"],
            "decode1_speedup": m["decode1_tok_s"] / base["decode1_tok_s"],
            "sharegpt128_ratio": m["sharegpt128_output_tok_s"] / base["sharegpt128_output_tok_s"],
        }
    if "kv-int8" in by:
        summary["kv_int8_capacity_ratio"] = by["kv-int8"]["kv_blocks_in_budget"] / base["kv_blocks_in_budget"]
    result["summary"] = summary
    for m in result["modes"]:
        m.pop("greedy", None)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.out + ".png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
