"""Command line: tokenmill generate | serve | monitor | bench (serve | offline | hf-baseline | roofline; see tokenmill.bench.cli)
| plan (capacity planner; see tokenmill.planner)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import DTYPES, KV_CACHE_DTYPES, MAX_SPECULATIVE_TOKENS, SPEC_METHODS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes (default: a fraction of free memory)")
    p.add_argument("--num-blocks", type=int, default=None, help="exact number of KV-cache blocks (overrides the budget)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="most KV bytes the prefix cache keeps for requests that have finished, least recently used "
                        "dropped first (default: 256 MiB on CPU, where KV memory becomes resident as it is used; "
                        "unbounded on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the previous step's tokens reach the host, overlapping host "
                        "work with the device's (default: on for CUDA, off on CPU)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV-cache storage: auto = the model dtype; int8 = int8 values with a float16 scale per token "
                        "per KV head (about half the bytes of bf16)")
    p.add_argument("--kv-window", type=int, default=None, metavar="N",
                   help="attend to the first --kv-sinks tokens and the last N only, freeing the blocks in between: "
                        "sequences may run past --max-model-len with bounded KV use (StreamingLLM)")
    p.add_argument("--kv-sinks", type=int, default=4, metavar="S", help="attention-sink tokens kept with --kv-window")
    p.add_argument("--quantization", default=None,
                   help="quantise weights at load time: int8 | int4 | mixed | a policy .json | gguf (keep a GGUF "
                        "file's own Q4/Q8 blocks); a `tokenmill quantize` output needs nothing")
    p.add_argument("--speculative-method", default=None, choices=list(SPEC_METHODS),
                   help="speculative decoding (default off): ngram = prompt lookup, draft = --speculative-model, "
                        "self = the model's first --speculative-draft-layers layers as its own draft")
    p.add_argument("--num-speculative-tokens", type=int, default=7, metavar="K",
                   help=f"most tokens proposed per step (1..{MAX_SPECULATIVE_TOKENS}; adaptive per sequence)")
    p.add_argument("--speculative-model", default=None, help="draft model sharing the target's tokenizer")
    p.add_argument("--speculative-draft-layers", type=int, default=None, metavar="K",
                   help="layers of the self-speculative draft (default: a quarter of the model's)")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=8, metavar="N",
                   help="no speculation while more than N sequences run")
    p.add_argument("--speculative-max-verify-rows", type=int, default=None, metavar="R",
                   help="most decode rows per step, proposed tokens included (default: 8 with the CPU bf16 kernel, "
                        "where up to 8 rows cost one plain step; no cap elsewhere)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        num_blocks=args.num_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        prefix_cache_bytes=args.prefix_cache_bytes,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_window=args.kv_window,
        kv_sinks=args.kv_sinks,
        quantization=args.quantization,
        speculative_method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens,
        speculative_model=args.speculative_model,
        speculative_draft_layers=args.speculative_draft_layers,
        speculative_disable_by_batch_size=args.speculative_disable_by_batch_size,
        speculative_max_verify_rows=args.speculative_max_verify_rows,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from . import LLM, SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("error: no prompts given (positional, --prompts-file, or stdin)", file=sys.stderr)
        return 2
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(**engine_kwargs(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 1)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outputs):
        for comp in out.outputs:
            if args.json:
                print(json.dumps({
                    "prompt": prompt, "index": comp.index, "text": comp.text, "token_ids": comp.token_ids,
                    "finish_reason": comp.finish_reason, "ttft_s": out.metrics.ttft,
                }))
            else:
                print(comp.text if args.chat else prompt + comp.text)
                print("-" * 40)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import EngineConfig
    from .serving.api_server import ServerConfig, run_server
    from .serving.registry import RegistryConfig, parse_size
    from .serving.response_cache import ResponseCacheConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get("TOKENMILL_API_KEY") or None
    server_cfg = ServerConfig(
        api_key=api_key,
        shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        warmup=not args.no_warmup,
    )
    if args.config is not None:
        if args.model is not None or args.served_model_name is not None:
            raise ValueError("--config names the models; drop --model / --served-model-name")
        registry_cfg = RegistryConfig.from_yaml(args.config)
        if args.response_cache is not None:
            registry_cfg.response_cache = ResponseCacheConfig(args.response_cache, registry_cfg.response_cache.max_bytes,
                                                              registry_cfg.response_cache.ttl_s)
    else:
        cache = ResponseCacheConfig(args.response_cache or "memory", parse_size(args.response_cache_bytes),
                                    args.response_cache_ttl)
        registry_cfg = RegistryConfig.single(EngineConfig(**engine_kwargs(args)), args.served_model_name,
                                             max_queued_requests=args.max_queued_requests or None,
                                             request_timeout=args.request_timeout, response_cache=cache)
    return run_server(registry_cfg, server_cfg, host=args.host, port=args.port, log_level=args.log_level or "INFO")


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quant.quantize import quantize_checkpoint

    if args.calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    res = quantize_checkpoint(args.model, args.method, args.out, args.group_size, args.calibration_samples,
                              args.calibration_seq_len, args.dtype)
    total, base = res.weight_bytes["total"], res.float_weight_bytes["total"]
    print(f"wrote {res.out_dir} in {res.seconds:.1f} s: weights {total / 2**20:.1f} MiB "
          f"({total / base:.2f}x of bf16 {base / 2**20:.1f} MiB)")
    for part, n in res.weight_bytes.items():
        if part != "total":
            print(f"  {part:13s} {n / 2**20:8.1f} MiB")
    if res.awq_report:
        gains = sorted(r["rtn_error"] / max(r["awq_error"], 1e-30) for r in res.awq_report.values())
        print(f"  AWQ: {len(gains)} int4 layers, layer output error vs round-to-nearest: median "
              f"{1 / gains[len(gains) // 2]:.2f}x, worst {1 / gains[0]:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill LLM serving engine")
    parser.add_argument("--log-level", default=None, help="default: INFO for serve, WARNING otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline for prompts")
    add_engine_args(g)
    g.add_argument("prompt", nargs="*", help="prompt text (or --prompts-file, or lines on stdin)")
    g.add_argument("--prompts-file")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("-n", type=int, default=1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per output")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (default: SmolLM2 on 127.0.0.1:8000)")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model's file or directory name)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $TOKENMILL_API_KEY)")
    s.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting to be scheduled before new ones get 429 (0: unbounded)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds before a request is aborted (default: none; a request's 'timeout' overrides)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT")
    s.add_argument("--max-body-bytes", type=int, default=2 * 2**20, help="largest request body accepted")
    s.add_argument("--max-n", type=int, default=16, help="largest n (completions per prompt) accepted")
    s.add_argument("--no-warmup", action="store_true", help="skip the warm-up requests before /health says ready")
    s.add_argument("--config", default=None, metavar="MODELS_YAML",
                   help="serve several models, with routing, fallback and memory shares, from a YAML file "
                        "(see README, 'Several models')")
    s.add_argument("--response-cache", default=None, metavar="BACKEND",
                   help="cache answers of deterministic requests (greedy or seeded): memory (default), off, or "
                        "redis://HOST:PORT/DB to share it between servers")
    s.add_argument("--response-cache-bytes", default="64MiB", help="in-process response cache size (default 64MiB)")
    s.add_argument("--response-cache-ttl", type=float, default=3600.0, help="seconds a cached answer lives")
    s.set_defaults(func=cmd_serve)

    q = sub.add_parser("quantize", help="write a quantised checkpoint (int8, int4, int4-awq, mixed or a policy file)")
    q.add_argument("--model", default=None, help="Hugging Face directory or .gguf file (default: embedded SmolLM2)")
    q.add_argument("--method", required=True,
                   help="int8 | int4 | int4-awq | mixed | a policy .json (see README, 'Quantisation')")
    q.add_argument("--out", required=True, help="output directory (serve it with --model DIR)")
    q.add_argument("--group-size", type=int, default=None, help="int4 group size (default 32)")
    q.add_argument("--calibration-samples", type=int, default=32, help="ShareGPT samples for AWQ (default 32)")
    q.add_argument("--calibration-seq-len", type=int, default=512)
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the weights left in floating point")
    q.set_defaults(func=cmd_quantize)

    from .bench.cli import add_bench_parser

    add_bench_parser(sub)

    from .planner import add_plan_parser

    add_plan_parser(sub)

    from .serving.monitor_view import add_monitor_parser

    add_monitor_parser(sub)

    args = parser.parse_args(argv)
    default_level = "INFO" if args.command == "serve" else "WARNING"
    logging.basicConfig(level=(args.log_level or default_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
