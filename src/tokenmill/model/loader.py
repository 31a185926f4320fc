"""Locating models and reading their config and weights (Hugging Face directories and GGUF files).

Weights are yielded under Hugging Face parameter names so the model code has a single naming scheme.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import mmap
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.config import ModelConfig

from .paths import is_gguf

logger = logging.getLogger(__name__)


# gguf `general.architecture` -> (HF architecture, attention has q/k/v bias, Q/K rows permuted by llama.cpp)
GGUF_ARCHS: dict[str, tuple[str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", False, True),  # also Mistral: llama.cpp converts it as "llama"
    "qwen2": ("Qwen2ForCausalLM", True, False),
}

# per-layer GGUF tensor names -> HF names
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# tensors that are not parameters of the HF model
_GGUF_SKIP = {"rope_freqs.weight"}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# HF checkpoint entries that are buffers, not parameters
_HF_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)

# gguf `general.file_type` -> dtype of an unquantised checkpoint
_GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


# ----------------------------------------------------------------------------- GGUF


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated file, ... (gguf raises assorted types)
        raise ValueError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e


def open_gguf(path: str) -> Any:
    """A `gguf.GGUFReader` for `path`, cached: parsing metadata (the vocabulary) takes ~1-2 s."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    st = os.stat(path)
    return _cached_reader(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def release_gguf_readers() -> None:
    """Drops the cached readers once loading is over: a reader keeps a numpy view per metadata array element (~145 MB
    for SmolLM2's 49k-token vocabulary and merges)."""
    _cached_reader.cache_clear()
    gc.collect()


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """Value of a GGUF metadata key (scalars as Python values, arrays as lists)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gguf_arch(reader: Any, path: str) -> tuple[str, str, bool, bool]:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path} (supported: {', '.join(GGUF_ARCHS)})"
        )
    return (arch, *GGUF_ARCHS[arch])


def _gguf_rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    kind = gguf_field(reader, f"{arch}.rope.scaling.type")
    factor = gguf_field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if factor is not None:
        scaling["factor"] = float(factor)
    orig = gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    attn = gguf_field(reader, f"{arch}.rope.scaling.attn_factor")
    if attn is not None:
        scaling["attention_factor"] = float(attn)
    return scaling


def _gguf_model_config(path: str) -> ModelConfig:
    reader = open_gguf(path)
    arch, hf_arch, bias, _ = _gguf_arch(reader, path)

    def req(key: str) -> Any:
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF file {path} lacks required metadata key {arch}.{key}")
        return value

    n_layers = int(req("block_count"))
    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = int(gguf_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(gguf_field(reader, f"{arch}.attention.key_length", hidden // n_heads))

    tensors = {t.name: t for t in reader.tensors}
    # vocab: rows of the embedding (GGUF shapes are reversed: [hidden, vocab]), else metadata / token list
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    else:
        vocab = gguf_field(reader, f"{arch}.vocab_size")
        if vocab is None:
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(f"cannot determine the vocabulary size of {path}")
            vocab = len(tokens.data)
    if "rope_freqs.weight" in tensors:
        logger.warning("%s has a rope_freqs tensor (llama3-style RoPE scaling); it is ignored", path)

    window = gguf_field(reader, f"{arch}.attention.sliding_window")
    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        tid = gguf_field(reader, key)
        if tid is not None and int(tid) not in eos_ids:
            eos_ids.append(int(tid))
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(reader, arch),
        max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=bias,
        sliding_windows=[int(window) if window else None] * n_layers,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        torch_dtype=_GGUF_FILE_DTYPES.get(gguf_field(reader, "general.file_type")),
    )


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation. The converter reorders each head's rows from the HF
    "rotate_half" layout [first half | second half] to interleaved pairs (GGML's RoPE):
    row (h, i, j) of shape (heads, 2, d/2) goes to (h, j, i) of (heads, d/2, 2). Invert that."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_DEQUANT_CHUNK_ELEMS = 1 << 21


def _dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A fresh float32 array of `shape` from GGUF tensor data (a copy: F32 data are read-only views of the memory
    map). Matrices go in chunks of rows: gguf's dequantize makes several float32 temporaries of its input's size,
    ~340 MB at once for SmolLM2's 28M-entry embedding."""
    from gguf.quants import dequantize

    out = np.empty(shape, dtype=np.float32)
    if data.ndim != 2 or len(shape) != 2 or data.shape[0] != shape[0]:
        out[...] = dequantize(data, qtype).reshape(shape)
        return out
    step = max(1, _DEQUANT_CHUNK_ELEMS // max(1, shape[1]))
    for r in range(0, shape[0], step):
        out[r : r + step] = dequantize(data[r : r + step], qtype).reshape(-1, shape[1])
    return out


def _iter_gguf(
    path: str, reader: Any, cfg: ModelConfig, permuted: bool, keep_quantized: bool = False
) -> Iterator[tuple[str, Any]]:
    from ..quant.gguf_blocks import GGUF_DIRECT_TYPES, gguf_quantized_weight, permute_rows

    for t in reader.tensors:
        if t.name in _GGUF_SKIP:
            continue
        if t.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[t.name]
            kind = None
        else:
            m = _GGUF_LAYER_RE.match(t.name)
            if m is None or m.group(2) not in _GGUF_LAYER_NAMES:
                logger.warning("skipping unknown GGUF tensor %s in %s", t.name, path)
                continue
            kind = m.group(2)
            name = f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[kind]}.{m.group(3)}"
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if keep_quantized and t.tensor_type.name in GGUF_DIRECT_TYPES and len(expected) == 2:
            qw = gguf_quantized_weight(t.tensor_type.name, t.data, expected)
            if permuted and kind in ("attn_q", "attn_k"):
                heads = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
                qw = permute_rows(qw, lambda x, h=heads: _unpermute_rows(x, h))
            yield name, qw
            continue
        try:
            # float32 in row-major HF orientation: GGUF lists dims fastest-first, i.e. reversed
            w = torch.from_numpy(_dequantize(t.data, t.tensor_type, expected))
        except Exception as e:
            raise ValueError(f"cannot dequantise tensor {t.name} ({t.tensor_type.name}) in {path}: {e}") from e
        if permuted and kind == "attn_q":
            w = _unpermute_rows(w, cfg.num_heads)
        elif permuted and kind == "attn_k":
            w = _unpermute_rows(w, cfg.num_kv_heads)
        yield name, w
    _drop_file_pages(reader)


def _drop_file_pages(reader: Any) -> None:
    """Every tensor has been copied out of the GGUF's memory map: drop the file's pages from this process's resident
    memory (~the file's size). The map stays valid; a later read faults the pages back in from the page cache."""
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's mmap.mmap
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


# ----------------------------------------------------------------------------- HF directories

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _hf_weight_files(path: str) -> list[str]:
    """The checkpoint files of a HF directory, checked to exist."""
    for index_name in _INDEX_FILES:
        index_path = os.path.join(path, index_name)
        if not os.path.isfile(index_path):
            continue
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt checkpoint index {index_path}: {e}") from e
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) listed in {index_path} are missing: {', '.join(missing)}")
        return files
    for name in _SINGLE_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return [file]
    raise FileNotFoundError(
        f"no weights found in {path}: expected {' or '.join(_SINGLE_FILES)} or a sharded index ({', '.join(_INDEX_FILES)})"
    )


def _iter_safetensors(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: bad header, truncated file, ...
        raise ValueError(f"cannot read safetensors file {file}: {e}") from e
    with handle as f:
        for key in f.keys():
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise ValueError(f"cannot read tensor {key!r} from {file}: {e}") from e
            yield key, tensor


def _iter_torch_bin(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"cannot read PyTorch checkpoint {file}: {e}") from e
    yield from state.items()


def _iter_hf_files(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        reader = _iter_safetensors if file.endswith(".safetensors") else _iter_torch_bin
        for name, tensor in reader(file):
            if name.endswith(_HF_SKIP_SUFFIXES):
                continue
            yield name, tensor


# ----------------------------------------------------------------------------- public entry points


def load_model_config(path: str) -> ModelConfig:
    """Model hyper-parameters from a HF directory (config.json) or a GGUF file's metadata."""
    if os.path.isdir(path):
        return ModelConfig.from_hf_dir(path)
    if is_gguf(path):
        return _gguf_model_config(path)
    raise FileNotFoundError(f"model path {path!r} is neither a directory nor a .gguf file")


def iter_weights(path: str, keep_quantized: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (HF parameter name, CPU tensor) pairs. HF checkpoints keep their stored dtype (and yield
    whatever parameters they store); GGUF tensors are dequantised to float32 with llama.cpp's Q/K
    permutation undone, and `lm_head.weight` appears only when the embeddings are untied. With `keep_quantized`
    GGUF's Q4_0/Q4_1/Q8_0 matrices come as QuantizedWeight instead (quant/gguf_blocks.py)."""
    if os.path.isdir(path):
        files = _hf_weight_files(path)  # eager: missing files fail here, not at the first next()
        logger.info("loading weights from %s (%d file(s))", path, len(files))
        return _iter_hf_files(files)
    if is_gguf(path):
        reader = open_gguf(path)
        cfg = _gguf_model_config(path)
        permuted = _gguf_arch(reader, path)[3]
        logger.info("loading and dequantising GGUF weights from %s", path)
        return _iter_gguf(path, reader, cfg, permuted, keep_quantized)
    raise FileNotFoundError(f"model path {path!r} is neither a directory nor a .gguf file")


def load_weights_into(model: Any, path: str, quantization: str | None = None) -> dict[str, dict]:
    """Loads `path` into a freshly built model and applies `quantization` (EngineConfig.quantization). A directory
    written by `tokenmill quantize` loads its quantised tensors directly. Returns the quantised layout."""
    from ..quant.apply import model_layout, quantize_model
    from ..quant.checkpoint import load_quantized_checkpoint, quantized_checkpoint_layout
    from ..quant.policy import resolve_policy

    if os.path.isdir(path) and quantized_checkpoint_layout(path) is not None:
        if quantization:
            logger.warning("%s is quantised already; ignoring quantization=%s", path, quantization)
        load_quantized_checkpoint(model, path)
        return model_layout(model)
    if quantization == "gguf":
        if not is_gguf(path):
            raise ValueError(f"quantization 'gguf' keeps a GGUF file's own blocks, but {path!r} is not a .gguf file")
        model.load_weights(iter_weights(path, keep_quantized=True))
        return model_layout(model)
    model.load_weights(iter_weights(path))
    if not quantization:
        return {}
    policy = resolve_policy(quantization)
    if policy.awq:
        if quantization == "int4-awq":
            raise ValueError(
                "int4-awq needs calibration: run `tokenmill quantize --method int4-awq --out DIR` once and serve DIR"
            )
        logger.info("policy %s: activation-aware scales need `tokenmill quantize`; using round-to-nearest", policy.name)
    return quantize_model(model, policy)
