"""Benchmark workloads: the streaming ShareGPT reader and the sharegpt-128 / decode-1 selections."""
from __future__ import annotations

import json
import os

import pytest

from tokenmill.bench import workloads
from tokenmill.bench.workloads import (
    SHAREGPT_128_TOTAL_TOKENS,
    decode1_prompt,
    encode_fn,
    iter_sharegpt_conversations,
    sharegpt_prompts,
)


@pytest.fixture(scope="module")
def sharegpt_file() -> str:
    try:
        return workloads.sharegpt_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _conv(i: int, first: str = "human", text: str | None = None) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": text or f"prompt {i} " + "x" * (i * 7)},
                                             {"from": "gpt", "value": "ok"}]}


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_stream_reader_stops_at_truncated_element(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(workloads, "_CHUNK", chunk)
    convs = [_conv(i) for i in range(20)]
    text = json.dumps(convs, indent=2)
    cut = text.rindex('"prompt 19')  # truncate mid-string inside the last element
    path = tmp_path / "trunc.json"
    path.write_text(text[: cut + 5], encoding="utf-8")
    assert list(iter_sharegpt_conversations(str(path))) == convs[:19]

    whole = tmp_path / "whole.json"
    whole.write_text(text, encoding="utf-8")
    assert list(iter_sharegpt_conversations(str(whole))) == convs
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]", encoding="utf-8")
    assert list(iter_sharegpt_conversations(str(empty))) == []


def test_stream_reader_is_lazy_and_selects_human_first_turns(tmp_path):
    convs = [_conv(0), _conv(1, first="gpt"), {"id": "e", "conversations": []}, _conv(3, text="hello world")]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(convs) + ',{"id": "broken', encoding="utf-8")
    texts = list(workloads.first_human_turns(str(path)))
    assert texts == [convs[0]["conversations"][0]["value"], "hello world"]
    enc = lambda s: s.split()  # noqa: E731  (one "token" per word)
    assert sharegpt_prompts(enc, num=2, min_tokens=1, max_tokens=10, path=str(path)) == [
        ["prompt", "0"], ["hello", "world"]]
    with pytest.raises(ValueError, match="only 2 prompts"):
        sharegpt_prompts(enc, num=3, min_tokens=1, max_tokens=10, path=str(path))


def test_sharegpt_file_decodes_to_the_truncation_point(sharegpt_file):
    n = 0
    for conv in iter_sharegpt_conversations(sharegpt_file):
        assert isinstance(conv, dict) and "conversations" in conv
        n += 1
    assert n == 17_671  # every complete element of the shipped (truncated) file


def test_sharegpt_128_selection(sharegpt_file, smollm2_hf_tokenizer):
    prompts = sharegpt_prompts(encode_fn(smollm2_hf_tokenizer))
    assert len(prompts) == 128
    assert all(4 <= len(p) <= 512 for p in prompts)
    assert sum(len(p) for p in prompts) == SHAREGPT_128_TOTAL_TOKENS == 11_130
    # raw completion prompts: no BOS / chat-template tokens were added
    assert prompts[0] == smollm2_hf_tokenizer.encode(
        next(workloads.first_human_turns(sharegpt_file)), add_special_tokens=False)

    # tokenmill's own tokenizer wrapper gives the same selection
    from tokenmill.model.tokenizer import Tokenizer

    ours = sharegpt_prompts(encode_fn(Tokenizer(smollm2_hf_tokenizer)))
    assert ours == prompts


def test_decode1_prompt(sharegpt_file, smollm2_hf_tokenizer):
    enc = encode_fn(smollm2_hf_tokenizer)
    p = decode1_prompt(enc)
    assert len(p) == 16
    first = enc(next(workloads.first_human_turns(sharegpt_file)))
    assert p == first[:16]


def test_model_path_is_the_embedded_gguf():
    path = workloads.smollm2_gguf_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
