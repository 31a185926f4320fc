"""`tokenmill generate` as a user runs it: a real subprocess on the embedded SmolLM2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_generate_chat_on_embedded_default(smollm2_gguf_path):
    res = run_cli("generate", "--chat", "--max-tokens", "12", "--json", "--kv-cache-bytes", str(32 * 2**20),
                  "What is the capital of France? Answer in one word.")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "paris" in out["text"].lower()
    assert out["finish_reason"] in ("stop", "length") and out["ttft_s"] > 0


def test_generate_bad_input_is_a_clear_error(tiny_model_factory):
    res = run_cli("generate", "--model", tiny_model_factory("llama"), "--temperature", "-1", "hello")
    assert res.returncode == 2
    assert "temperature" in res.stderr
    res = run_cli("generate", "--model", "/nonexistent/model/dir", "hello")
    assert res.returncode == 2 and "/nonexistent/model/dir" in res.stderr
