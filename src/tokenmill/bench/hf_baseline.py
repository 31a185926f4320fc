"""The HF transformers peer: ``model.generate`` on static batches of left-padded prompts.

This is "the naive server design" of WORKLOADS.md: requests are cut into fixed batches of 16 in
arrival order, each batch is left-padded to its longest prompt and decoded to completion before the
next batch starts. It loads the same GGUF the engine serves (dequantised to the serving dtype), or a HF
directory. The command line is ``tokenmill bench hf-baseline`` (tokenmill.bench.cli).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any

import torch

from .workloads import smollm2_gguf_path

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


@dataclass
class HFRunResult:
    """One timed run of the HF baseline over a list of prompts."""

    dtype: str
    batch_size: int
    num_requests: int
    num_batches: int
    prompt_tokens: int
    output_tokens: int
    max_new_tokens: int
    wall_time: float
    batch_times: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def requests_s(self) -> float:
        return self.num_requests / self.wall_time if self.wall_time > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        d["output_tok_s"] = self.output_tok_s
        d["requests_s"] = self.requests_s
        return d


@dataclass
class HFDecodeResult:
    """One request decoded alone (batch 1): TTFT and decode-phase tokens/s."""

    dtype: str
    prompt_tokens: int
    output_tokens: int
    ttft: float
    decode_time: float
    wall_time: float
    output: list[int] = field(default_factory=list, repr=False)

    @property
    def decode_tok_s(self) -> float:
        # tokens after the first one, over the time after the first one
        return (self.output_tokens - 1) / self.decode_time if self.decode_time > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("output")
        d["decode_tok_s"] = self.decode_tok_s
        return d


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def load_hf_model(path: str | None = None, dtype: str | torch.dtype = "bfloat16") -> tuple[Any, Any]:
    """(model, tokenizer) via transformers from a GGUF file (weights dequantised to ``dtype``) or a HF
    directory; eval mode. Default: the embedded SmolLM2 GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or smollm2_gguf_path()
    if os.path.isdir(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
        model.eval()
        return model, AutoTokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model path {path!r} is neither a directory nor a .gguf file")
    directory, name = os.path.dirname(path), os.path.basename(path)
    kwargs: dict[str, Any] = {"gguf_file": name, "dtype": resolve_dtype(dtype)}
    try:  # transformers 5.x: ask for a plain dense model explicitly (it is also the fallback)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def pad_token_id_of(model: Any, tokenizer: Any | None = None) -> int:
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None) if src is not None else None
        if pid is not None:
            return int(pid)
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return 0


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [B, max_len], prompts aligned to the right."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad_id: int, **kw: Any):
    return model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # exactly max_new_tokens: EOS is never allowed to end a row
        pad_token_id=pad_id,
        use_cache=True,
        **kw,
    )


def run_static_batches(
    model: Any,
    prompts: list[list[int]],
    batch_size: int = 16,
    max_new_tokens: int | Sequence[int] = 128,
    pad_token_id: int | None = None,
    dtype: str = "",
) -> HFRunResult:
    """Greedy-generate exactly ``max_new_tokens`` (one for all, or one per prompt) for every prompt,
    ``batch_size`` prompts at a time. A batch runs until its longest request is done (the static design);
    only the tokens each request asked for are counted and returned."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(wanted) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(wanted)} max_new_tokens")
    pad_id = pad_token_id_of(model) if pad_token_id is None else pad_token_id
    outputs: list[list[int]] = []
    batch_times: list[float] = []
    out_tokens = 0
    with torch.inference_mode():
        start = time.perf_counter()
        for b in range(0, len(prompts), batch_size):
            batch, batch_wanted = prompts[b:b + batch_size], wanted[b:b + batch_size]
            steps = max(batch_wanted)
            t0 = time.perf_counter()
            ids, mask = left_pad(batch, pad_id)
            seq = _generate(model, ids, mask, steps, pad_id)
            new = seq[:, ids.shape[1]:]
            batch_times.append(time.perf_counter() - t0)
            if new.shape[1] != steps:
                raise RuntimeError(f"HF generate returned {new.shape[1]} new tokens, expected {steps}")
            for row, n in zip(new.tolist(), batch_wanted):
                outputs.append(row[:n])
                out_tokens += n
        wall = time.perf_counter() - start
    return HFRunResult(
        dtype=dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        batch_size=batch_size,
        num_requests=len(prompts),
        num_batches=len(batch_times),
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens=out_tokens,
        max_new_tokens=max(wanted, default=0),
        wall_time=wall,
        batch_times=batch_times,
        outputs=outputs,
    )


class _TimingStreamer:
    """Records when generate hands over each chunk; the first put is the prompt, the second the first token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_decode1(
    model: Any,
    prompt: list[int],
    max_new_tokens: int = 256,
    pad_token_id: int | None = None,
    dtype: str = "",
) -> HFDecodeResult:
    """One request alone: TTFT (prompt -> first new token) and decode time (first -> last token)."""
    pad_id = pad_token_id_of(model) if pad_token_id is None else pad_token_id
    ids, mask = left_pad([prompt], pad_id)
    streamer = _TimingStreamer()
    with torch.inference_mode():
        start = time.perf_counter()
        seq = _generate(model, ids, mask, max_new_tokens, pad_id, streamer=streamer)
        end = time.perf_counter()
    new = seq[0, ids.shape[1]:].tolist()
    # times[0]: prompt pushed, times[1]: first generated token, times[-1]: last one
    first = streamer.times[1] if len(streamer.times) > 1 else end
    return HFDecodeResult(
        dtype=dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        prompt_tokens=len(prompt),
        output_tokens=len(new),
        ttft=first - start,
        decode_time=(streamer.times[-1] if len(streamer.times) > 1 else end) - first,
        wall_time=end - start,
        output=new,
    )
