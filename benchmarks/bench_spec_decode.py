"""Speculative decoding on SmolLM2-135M on this CPU, speculation on vs off in the same run.

Workloads (greedy, EOS ignored, one request at a time = decode-1 conditions):
- input-grounded: chat prompts that ask the model to repeat, proofread or summarise a text they contain. The texts
  are the first --num-prompts ShareGPT first human turns of 120..400 tokens (tokenmill.bench.workloads), one
  instruction each in turn (INSTRUCTIONS); --max-tokens new tokens. Run with speculation off and with n-gram
  (prompt lookup) speculation.
- plain: the decode-1 ShareGPT prompts (first human turns cut to 16 tokens, raw completion), off vs the
  self-speculative draft (the first --draft-layers layers).
- load (--load-repeats > 0): sharegpt-128 (WORKLOADS.md) offline with max_num_seqs 16, n-gram speculation on vs
  off, timed alternately: adaptive k / the batch-size cut-off must keep throughput (median of the repeats).
Decode tokens/s per request = (tokens - 1) / (time of last token - time of first); the median over requests is
reported, with each prompt run by the speculating and the plain engine back to back. Writes
benchmarks/results/spec_decode_cpu.{json,png}.

    python benchmarks/bench_spec_decode.py [--num-prompts 16] [--max-tokens 128] [--load-repeats 3]
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
        chat = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True, tokenize=False)
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


def decode_one(engine, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """One request alone: decode tokens/s ((tokens - 1) / (last token time - first token time)) and its tokens."""
    from tokenmill import SamplingParams

    engine.add_request("r", None, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0),
                       prompt_token_ids=prompt)
    stamps: list[float] = []
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            stamps.extend([time.perf_counter()] * (n - len(stamps)))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), list(out.outputs[0].token_ids)


def compare(prompts, max_tokens: int, dtype: str, name: str, **spec) -> dict[str, Any]:
    """Speculation off vs `spec`, each prompt run by both engines back to back (so machine noise hits both alike);
    medians of the per-request rates and of the per-prompt speed-ups."""
    from tokenmill import LLM

    llms = {"off": LLM(dtype=dtype, kv_cache_bytes=256 * 2**20, enable_prefix_caching=False),
            name: LLM(dtype=dtype, kv_cache_bytes=256 * 2**20, enable_prefix_caching=False, **spec)}
    for llm in llms.values():  # warm-up
        decode_one(llm.engine, prompts[0], 8)
    llms[name].engine.spec.reset_stats()
    rates: dict[str, list[float]] = {k: [] for k in llms}
    outputs: dict[str, list[list[int]]] = {k: [] for k in llms}
    for prompt in prompts:
        for key, llm in llms.items():
            rate, toks = decode_one(llm.engine, prompt, max_tokens)
            rates[key].append(rate)
            outputs[key].append(toks)
    res: dict[str, Any] = {key: {"decode_tok_s": statistics.median(v), "per_request_tok_s": v}
                           for key, v in rates.items()}
    res[name].update({k: v for k, v in llms[name].engine.stats().items() if k.startswith("spec_decode")})
    res["speedup"] = res[name]["decode_tok_s"] / res["off"]["decode_tok_s"]
    res["median_per_prompt_speedup"] = statistics.median(b / a for a, b in zip(rates["off"], rates[name]))
    res["same_output"] = outputs["off"] == outputs[name]
    return res


def under_load(dtype: str, repeats: int, k: int) -> dict[str, Any]:
    """sharegpt-128 offline with max_num_seqs 16 (concurrency 16), speculation off and n-gram on, the two engines
    built once and timed alternately `repeats` times after a full warm-up pass; medians."""
    from tokenmill import LLM
    from tokenmill.bench.offline import run_offline
    from tokenmill.bench.workloads import build_workload, load_hf_tokenizer

    workload = build_workload("sharegpt", load_hf_tokenizer())
    configs = {"off": {}, "ngram": dict(speculative_method="ngram", num_speculative_tokens=k)}
    llms = {name: LLM(dtype=dtype, max_num_seqs=16, **kw) for name, kw in configs.items()}
    for llm in llms.values():
        run_offline(llm, workload)
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, llm in llms.items():
            runs[name].append(run_offline(llm, workload)["output_tok_s"])
    res: dict[str, Any] = {name: {"output_tok_s": statistics.median(v), "runs": v} for name, v in runs.items()}
    res["ngram"].update({k_: v for k_, v in llms["ngram"].engine.stats().items() if k_.startswith("spec_decode")})
    res["ratio"] = res["ngram"]["output_tok_s"] / res["off"]["output_tok_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=7, help="num_speculative_tokens (the engine default)")
    p.add_argument("--draft-layers", type=int, default=8, help="layers of the self-speculative draft (of 30)")
    p.add_argument("--load-repeats", type=int, default=3, help="timed sharegpt-128 runs per config; 0: skip")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    from tokenmill.model.paths import default_model_path
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
    res["grounded"] = compare(grounded, args.max_tokens, args.dtype, "ngram", speculative_method="ngram",
                              num_speculative_tokens=args.k)
    res["plain"] = compare(plain, args.max_tokens, args.dtype, "self", speculative_method="self",
                           num_speculative_tokens=args.k, speculative_draft_layers=args.draft_layers)
    if args.load_repeats:
        res["load16"] = under_load(args.dtype, args.load_repeats, args.k)
    res["seconds"] = time.perf_counter() - t0
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
        print(f"sharegpt-128, max_num_seqs 16: off {res['load16']['off']['output_tok_s']:.1f} tok/s, ngram "
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
