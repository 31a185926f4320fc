"""Architecture name -> model class."""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return _MODELS[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {cfg.architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
