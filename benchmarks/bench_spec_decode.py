"""Speculative decoding on SmolLM2-135M on this CPU, speculation on vs off in the same run.

Workloads (greedy, EOS ignored, one request at a time = decode-1 conditions):
- input-grounded: chat prompts that ask the model to repeat, proofread or summarise a text they contain. The texts
  are the first --num-prompts ShareGPT first human turns of 120..400 tokens (tokenmill.bench.workloads), one
  instruction each in turn (INSTRUCTIONS); --max-tokens new tokens. Run with speculation off and with n-gram
  (prompt lookup) speculation.
- plain: the decode-1 ShareGPT prompts (first human turns cut to 16 tokens, raw completion), off vs the
  self-speculative draft (the first --draft-layers layers).
- load (optional, --load-prompts > 0): the first ShareGPT prompts, all submitted at once with max_num_seqs 16,
  n-gram speculation on vs off: adaptive k / the batch-size cut-off must keep throughput.
Decode tokens/s per request = (tokens - 1) / (time of last token - time of first); the median over requests is
reported. Writes benchmarks/results/spec_decode_cpu.{json,png}.

    python benchmarks/bench_spec_decode.py [--num-prompts 4] [--max-tokens 128] [--load-prompts 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from tokenmill.bench.machine import basic_machine_info  # noqa: E402
from tokenmill.bench.workloads import first_human_turns  # noqa: E402

INSTRUCTIONS = [
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Correct any spelling or grammar mistakes in the following text and return the full corrected text:\n\n{text}",
    "Rewrite the following text, keeping its wording as close to the original as possible:\n\n{text}",
    "Summarise the following text, quoting its key sentences:\n\n{text}",
]


def grounded_prompts(tok, num: int, min_tokens: int = 120, max_tokens: int = 400) -> list[list[int]]:
    prompts = []
    for text in first_human_turns():
        n = len(tok.encode(text, add_special_tokens=False))
        if not min_tokens <= n <= max_tokens:
            continue
        body = INSTRUCTIONS[len(prompts) % len(INSTRUCTIONS)].format(text=text)
        chat = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True)
        prompts.append(tok.encode(chat, add_special_tokens=False))
        if len(prompts) == num:
            break
    return prompts


def plain_prompts(tok, num: int, length: int = 16) -> list[list[int]]:
    prompts = []
    for text in first_human_turns():
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
            if len(prompts) == num:
                break
    return prompts


def one_at_a_time(llm, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    from tokenmill import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    rates, outputs = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=prompt)
        stamps: list[float] = []
        out = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                stamps.extend([time.perf_counter()] * (n - len(stamps)))
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        outputs.append(out.outputs[0].token_ids)
    stats = engine.stats()
    return {"decode_tok_s": statistics.median(rates), "per_request_tok_s": rates, "outputs": outputs,
            **{k: v for k, v in stats.items() if k.startswith("spec_decode")}}


def run_config(prompts, max_tokens: int, dtype: str, **spec) -> dict[str, Any]:
    from tokenmill import LLM

    llm = LLM(dtype=dtype, kv_cache_bytes=256 * 2**20, enable_prefix_caching=False, **spec)
    one_at_a_time(llm, prompts[:1], 8)  # warm-up
    if llm.engine.spec is not None:
        llm.engine.spec.reset_stats()
    return one_at_a_time(llm, prompts, max_tokens)


def under_load(prompts, max_tokens: int, dtype: str, **spec) -> dict[str, Any]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(dtype=dtype, kv_cache_bytes=512 * 2**20, enable_prefix_caching=False, max_num_seqs=16, **spec)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / dt, "seconds": dt,
            **{k: v for k, v in llm.engine.stats().items() if k.startswith("spec_decode")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    p.add_argument("--draft-layers", type=int, default=8, help="layers of the self-speculative draft (of 30)")
    p.add_argument("--load-prompts", type=int, default=32, help="0: skip the under-load check")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    from tokenmill.model.loader import default_model_path
    from tokenmill.model.tokenizer import Tokenizer

    tok = Tokenizer.from_path(default_model_path())
    grounded = grounded_prompts(tok, args.num_prompts)
    plain = plain_prompts(tok, args.num_prompts)
    res: dict[str, Any] = {
        "benchmark": "spec_decode", "machine": basic_machine_info(), "dtype": args.dtype, "k": args.k,
        "workloads": {"grounded": {"instructions": INSTRUCTIONS, "prompt_tokens": [len(x) for x in grounded]},
                      "plain": {"prompt_tokens": [len(x) for x in plain]}, "max_tokens": args.max_tokens},
    }
    t0 = time.perf_counter()
    off = run_config(grounded, args.max_tokens, args.dtype)
    ngram = run_config(grounded, args.max_tokens, args.dtype, speculative_method="ngram",
                       num_speculative_tokens=args.k)
    res["grounded"] = {"off": off, "ngram": ngram, "speedup": ngram["decode_tok_s"] / off["decode_tok_s"],
                       "same_output": off["outputs"] == ngram["outputs"]}
    off_p = run_config(plain, args.max_tokens, args.dtype)
    selfd = run_config(plain, args.max_tokens, args.dtype, speculative_method="self",
                       num_speculative_tokens=args.k, speculative_draft_layers=args.draft_layers)
    res["plain"] = {"off": off_p, "self": selfd, "speedup": selfd["decode_tok_s"] / off_p["decode_tok_s"],
                    "same_output": off_p["outputs"] == selfd["outputs"]}
    if args.load_prompts:
        from tokenmill.bench.workloads import sharegpt_prompts

        load = sharegpt_prompts(lambda t: tok.encode(t, add_special_tokens=False), num=args.load_prompts)
        lo = under_load(load, 64, args.dtype)
        ln = under_load(load, 64, args.dtype, speculative_method="ngram", num_speculative_tokens=args.k)
        res["load16"] = {"off": lo, "ngram": ln, "ratio": ln["output_tok_s"] / lo["output_tok_s"]}
    res["seconds"] = time.perf_counter() - t0
    for part in ("grounded", "plain"):
        for cfg in res[part].values():
            if isinstance(cfg, dict):
                cfg.pop("outputs", None)

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "spec_decode_cpu.json"), "w") as f:
        json.dump(res, f, indent=2)
    _plot(res, os.path.join(args.out_dir, "spec_decode_cpu.png"))
    g, pl = res["grounded"], res["plain"]
    print(f"grounded: off {g['off']['decode_tok_s']:.1f} tok/s, ngram {g['ngram']['decode_tok_s']:.1f} tok/s "
          f"({g['speedup']:.2f}x, acceptance {g['ngram'].get('spec_decode_acceptance_rate', 0):.2f}, "
          f"same output {g['same_output']})")
    print(f"plain: off {pl['off']['decode_tok_s']:.1f} tok/s, self {pl['self']['decode_tok_s']:.1f} tok/s "
          f"({pl['speedup']:.2f}x, acceptance {pl['self'].get('spec_decode_acceptance_rate', 0):.2f}, "
          f"same output {pl['same_output']})")
    if "load16" in res:
        print(f"load (max_num_seqs 16): off {res['load16']['off']['output_tok_s']:.1f} tok/s, ngram "
              f"{res['load16']['ngram']['output_tok_s']:.1f} tok/s ({res['load16']['ratio']:.2f}x)")
    return 0


def _plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["grounded\noff", "grounded\nn-gram", "plain\noff", "plain\nself-draft"]
    vals = [res["grounded"]["off"]["decode_tok_s"], res["grounded"]["ngram"]["decode_tok_s"],
            res["plain"]["off"]["decode_tok_s"], res["plain"]["self"]["decode_tok_s"]]
    colors = ["#bbbbbb", "#2a7ab9", "#bbbbbb", "#d9822b"]
    if "load16" in res:
        names += ["load 16\noff", "load 16\nn-gram"]
        vals += [res["load16"]["off"]["output_tok_s"], res["load16"]["ngram"]["output_tok_s"]]
        colors += ["#bbbbbb", "#2a7ab9"]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, vals, color=colors)
    for rect, v in zip(bars, vals):
        ax.annotate(f"{v:.1f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel("decode tokens/s per request (load: output tokens/s)")
    acc_g = res["grounded"]["ngram"].get("spec_decode_acceptance_rate", 0)
    acc_s = res["plain"]["self"].get("spec_decode_acceptance_rate", 0)
    ax.set_title(f"speculative decoding, SmolLM2-135M {res['dtype']}, k={res['k']}: n-gram acceptance {acc_g:.2f}, "
                 f"self-draft acceptance {acc_s:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
