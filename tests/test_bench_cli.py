"""`tokenmill bench` (serve | offline | hf-baseline | roofline) and the benchmark workloads, on tiny models."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tokenmill.bench import workloads as wl
from tokenmill.cli import main

SERVE_ARGS = ("--dtype", "float32", "--kv-cache-bytes", str(16 * 2**20), "--no-prefix-caching")
SMALL_RANDOM = ("--workload", "random", "--num-prompts", "4", "--input-len", "16", "--output-len", "6")


@pytest.fixture(scope="module")
def tiny_server(tiny_model_factory):
    from server_process import ServerProcess

    model = tiny_model_factory("llama")
    server = ServerProcess("--model", model, *SERVE_ARGS, env={"OMP_NUM_THREADS": "1"})
    try:
        yield server, model
    finally:
        server.stop()


def test_serve_sweep_against_tokenmill_server(tiny_server, tmp_path):
    server, model = tiny_server
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    res = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", server.url, "--tokenizer", model,
         *SMALL_RANDOM, "--range-ratio", "0.5", "--concurrency", "1,2", "--slo-ttft-ms", "60000",
         "--slo-tpot-ms", "60000", "--slo-e2e-ms", "600000", "--result-json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["concurrency"] for r in data["runs"]] == [1, 2]
    wanted = data["workload"]["output_tokens"]
    for run in data["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0
        assert run["total_output_tokens"] == wanted  # ignore_eos honoured, per-request lengths kept
        assert run["output_throughput"] > 0 and run["request_throughput"] > 0
        for m in ("ttft", "tpot", "itl", "e2e"):
            assert run[m]["median"] > 0 and run[m]["p99"] >= run[m]["median"]
        assert run["good_requests"] == 4
        assert len(run["requests"]) == 4
    assert data["workload"]["name"] == "random" and data["model"]
    assert data["config"]["slo_e2e_ms"] == 600000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "out tok/s" in res.stdout  # the sweep table


def test_offline_and_hf_baseline_on_tiny_model(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("llama")
    out = tmp_path / "offline.json"
    rc = main(["bench", "offline", "--model", model, "--dtype", "float32", "--kv-cache-bytes", str(16 * 2**20),
               *SMALL_RANDOM, "--no-progress", "--result-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["result"]
    assert r["num_requests"] == 4 and r["output_tokens"] == 4 * 6 and r["short_requests"] == 0
    assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"] and r["requests_s"] > 0
    assert r["ttft"]["median"] > 0 and all(q["ttft"] > 0 for q in r["requests"])
    assert "output tok/s" in capsys.readouterr().out

    rc = main(["bench", "offline", "--model", model, "--dtype", "float32", "--kv-cache-bytes", str(16 * 2**20),
               "--workload", "decode-1", "--output-len", "12", "--no-progress", "--result-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["result"]
    assert r["num_requests"] == 1 and r["prompt_tokens"] == 16 and r["output_tokens"] == 12
    assert r["decode_tok_s"]["median"] > 0

    hf_out = tmp_path / "hf.json"
    rc = main(["bench", "hf-baseline", "--model", model, "--dtype", "float32", "--batch-size", "2",
               *SMALL_RANDOM, "--range-ratio", "0.5", "--result-json", str(hf_out)])
    assert rc == 0
    d = json.loads(hf_out.read_text())
    assert d["result"]["num_batches"] == 2 and d["result"]["output_tokens"] == d["workload"]["output_tokens"]
    assert d["result"]["output_tok_s"] > 0


def test_roofline_quick_counts_params_like_transformers(tiny_llama_dir, tiny_model_factory, tmp_path, capsys):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokenmill.model.loader import load_model_config

    path = tiny_llama_dir(tie=False)
    out = tmp_path / "roofline.json"
    assert main(["bench", "roofline", "--quick", "--model", path, "--dtypes", "float32,bfloat16",
                 "--result-json", str(out)]) == 0
    d = json.loads(out.read_text())
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert d["params"] == sum(p.numel() for p in ref.parameters())
    assert d["machine"]["bandwidth"]["copy_gb_s"] > 0 and d["bandwidth_gb_s_used"] > 0
    for dtype, elem in (("float32", 4), ("bfloat16", 2)):
        r = d["per_dtype"][dtype]
        assert r["weight_bytes"] == d["params"] * elem
        assert r["matmul_gflop_s"] > 0 and r["decode_tok_s_limit"] > 0 and r["throughput_tok_s_limit"] > 0
    assert "decode tok/s limit" in capsys.readouterr().out
    # tied embeddings, QKV bias (qwen2): the count still matches the instantiated model
    for p in (tiny_llama_dir(name="tied", tie=True), tiny_model_factory("qwen2")):
        ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(p), dtype=torch.float32)
        assert load_model_config(p).num_params == sum(x.numel() for x in ref.parameters())


@pytest.mark.parametrize("argv, message", [
    (["serve", "--concurrency", "0"], "concurrency must be >= 1"),
    (["serve", "--concurrency", "1,x"], "--concurrency"),
    (["serve", "--workload", "nope"], "invalid choice: 'nope'"),
    (["serve", "--request-rate", "0"], "--request-rate"),
    (["serve", "--range-ratio", "1.5"], "--range-ratio"),
    (["offline", "--workload", "random", "--num-prompts", "0"], "--num-prompts"),
    (["roofline", "--dtypes", "int3"], "--dtypes"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_workload_flag_it_does_not_take_exits_2(capsys):
    # checked before the tokenizer or the server is touched
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--workload", "sharegpt",
                 "--input-len", "5"]) == 2
    assert "workload sharegpt does not take --input-len" in capsys.readouterr().err


def test_server_that_never_gets_ready_exits_1(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--workload", "random",
                 "--num-prompts", "2", "--ready-timeout", "1"]) == 1
    assert f"http://127.0.0.1:{port}/health not ready after 1 s" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- workloads


@pytest.fixture(scope="module")
def sharegpt_file() -> str:
    try:
        return wl.sharegpt_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_prefix_shared_and_long_context_workloads(sharegpt_file, smollm2_hf_tokenizer):
    w = wl.build_workload("prefix-shared", smollm2_hf_tokenizer)
    assert w.num_requests == 64 and w.max_tokens == [64] * 64
    assert all(len(p) == 384 + 32 for p in w.prompts)
    assert all(p[:384] == w.prompts[0][:384] for p in w.prompts)  # one shared system prompt
    assert len({tuple(p[384:]) for p in w.prompts}) == 64  # distinct suffixes
    special = wl.special_ids_of(smollm2_hf_tokenizer)
    assert special and not any(t in special for p in w.prompts for t in p)

    w = wl.build_workload("long-context", smollm2_hf_tokenizer)
    assert w.num_requests == 4 and w.max_tokens == [64] * 4
    assert [len(p) for p in w.prompts] == [2000] * 4
    assert len({tuple(p) for p in w.prompts}) == 4

    w = wl.build_workload("prefix-shared", smollm2_hf_tokenizer, num_prompts=3, prefix_len=20, suffix_len=5,
                          output_len=7)
    assert [len(p) for p in w.prompts] == [25] * 3 and w.max_tokens == [7] * 3
    w = wl.build_workload("sharegpt", smollm2_hf_tokenizer, num_prompts=3, output_len=5)
    assert w.num_requests == 3 and w.max_tokens == [5] * 3 and w.describe()["name"] == "sharegpt"
    w = wl.build_workload("decode-1", smollm2_hf_tokenizer)
    assert [len(p) for p in w.prompts] == [16] and w.max_tokens == [256]


def test_random_workload_is_seeded_and_avoids_special_tokens(smollm2_hf_tokenizer):
    tok = smollm2_hf_tokenizer
    special = wl.special_ids_of(tok)
    a = wl.build_workload("random", tok, num_prompts=50, input_len=40, output_len=20, range_ratio=0.5, seed=3)
    b = wl.build_workload("random", tok, num_prompts=50, input_len=40, output_len=20, range_ratio=0.5, seed=3)
    c = wl.build_workload("random", tok, num_prompts=50, input_len=40, output_len=20, range_ratio=0.5, seed=4)
    assert a.prompts == b.prompts and a.max_tokens == b.max_tokens and a.prompts != c.prompts
    assert all(20 <= len(p) <= 60 for p in a.prompts) and len({len(p) for p in a.prompts}) > 1
    assert all(10 <= n <= 30 for n in a.max_tokens)
    assert all(0 <= t < len(tok) and t not in special for p in a.prompts for t in p)
    fixed = wl.build_workload("random", tok, num_prompts=5, input_len=12, output_len=3)
    assert [len(p) for p in fixed.prompts] == [12] * 5 and fixed.max_tokens == [3] * 5
    with pytest.raises(ValueError, match="does not take prefix_len"):
        wl.build_workload("random", tok, prefix_len=3)
    with pytest.raises(ValueError, match="unknown workload"):
        wl.build_workload("nope", tok)
