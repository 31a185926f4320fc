"""Quantised checkpoints: a directory with config.json (Hugging Face fields plus a ``quantization_config`` of
``quant_method: tokenmill`` holding the per-layer layout), the tokenizer, and model.safetensors with our module
names (fused qkv_proj / gate_up_proj; quantised layers as qweight / scales / zeros in the portable format)."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig
from .apply import install_layout

logger = logging.getLogger(__name__)

QUANT_METHOD = "tokenmill"
WEIGHTS_FILE = "model.safetensors"


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json that ModelConfig.from_hf_config reads back into `cfg`."""
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
    windows = {w for w in cfg.sliding_windows if w is not None}
    out: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": model_type.get(cfg.architecture, "llama"),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids or None,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if windows:
        out["sliding_window"] = windows.pop()
        out["use_sliding_window"] = True
        out["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in cfg.sliding_windows]
    return out


def quantized_checkpoint_layout(path: str) -> dict[str, dict] | None:
    """The layout stored in a `tokenmill quantize` directory, or None for any other checkpoint."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return None
    if qc.get("quant_method") != QUANT_METHOD:
        return None
    return qc["layout"]


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each stored once (tied embeddings/head share storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_quantized_checkpoint(model: nn.Module, layout: dict[str, dict], out_dir: str, tokenizer: Any,
                              extra: dict[str, Any] | None = None) -> str:
    """Writes `model` (already quantised by quantize_model) and its tokenizer to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    cfg = hf_config_dict(model.config, dtype)
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "layout": layout, **(extra or {})}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(_state_to_save(model), os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer.chat_template:
        tokenizer.hf.chat_template = tokenizer.chat_template  # GGUF templates live outside the HF object
    tokenizer.hf.save_pretrained(out_dir)
    logger.info("wrote quantised checkpoint to %s", out_dir)
    return out_dir


def load_quantized_checkpoint(model: nn.Module, path: str) -> None:
    layout = quantized_checkpoint_layout(path)
    if layout is None:
        raise ValueError(f"{path} is not a tokenmill quantised checkpoint")
    install_layout(model, layout)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"quantised checkpoint {path} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(file)
    except Exception as e:
        raise ValueError(f"corrupt checkpoint file {file}: {e}") from e
    expected = _state_to_save(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"checkpoint {file} does not match its layout: missing {missing[:6]}, unexpected {unexpected[:6]}")
    state = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"{file}: {name} has shape {tuple(t.shape)}, expected {tuple(state[name].shape)}")
            state[name].copy_(t)
