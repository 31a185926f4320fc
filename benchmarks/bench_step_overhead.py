"""Engine overhead per decode step: wall time of `LLMEngine.step()` against the model forward inside it.

Batch of B sequences (sharegpt-128 prompts, greedy, ignore EOS) decoding together; once every sequence is past its
prefill, N steps are timed. The forward is timed by wrapping the model's `forward`; everything else in a step
(scheduling, batch tensors, sampling, detokenisation, stop checks, outputs) is overhead. Reports medians and
writes benchmarks/results/step_overhead_cpu.json.

    python benchmarks/bench_step_overhead.py [--batch 16] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.machine import basic_machine_info  # noqa: E402
from tokenmill.bench.workloads import encode_fn, load_hf_tokenizer, sharegpt_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "step_overhead_cpu.json"))
    args = p.parse_args(argv)

    prompts = sharegpt_prompts(encode_fn(load_hf_tokenizer()))
    llm = LLM(dtype=args.dtype, max_num_seqs=max(args.batch), kv_cache_bytes=1 << 30, enable_prefix_caching=False)
    engine = llm.engine
    model = engine.model
    forward_times: list[float] = []
    inner = model.forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        forward_times.append(time.perf_counter() - t0)
        return out

    model.forward = timed_forward
    results = {"benchmark": "step_overhead", "machine": basic_machine_info(), "dtype": args.dtype, "batches": {}}
    params = SamplingParams(max_tokens=args.steps + 40, ignore_eos=True, temperature=0)
    for b in args.batch:
        for i, ids in enumerate(prompts[:b]):
            engine.add_request(f"b{b}-{i}", None, params, prompt_token_ids=ids)
        while engine.last_step_num_tokens != b or engine.scheduler.waiting:
            engine.step()
        for _ in range(5):
            engine.step()
        steps, fwd = [], []
        for _ in range(args.steps):
            forward_times.clear()
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
            fwd.append(sum(forward_times))
        while engine.has_unfinished_requests():
            for rid in list(engine.groups):
                engine.abort_request(rid)
            engine.step()
        step_ms, fwd_ms = statistics.median(steps) * 1e3, statistics.median(fwd) * 1e3
        over = [s - f for s, f in zip(steps, fwd)]
        results["batches"][str(b)] = {
            "step_ms_median": step_ms,
            "forward_ms_median": fwd_ms,
            "overhead_ms_median": statistics.median(over) * 1e3,
            "overhead_fraction": statistics.median([o / s for o, s in zip(over, steps)]),
            "decode_tok_s": b / statistics.median(steps),
        }
        r = results["batches"][str(b)]
        print(f"batch {b:>3}: step {step_ms:.1f} ms, forward {fwd_ms:.1f} ms, outside the forward "
              f"{r['overhead_ms_median']:.2f} ms ({100 * r['overhead_fraction']:.1f}%)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
