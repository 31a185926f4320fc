"""tokenmill: a small, fast LLM serving engine.

The public names load on first use, so a process that needs only part of the package (the HTTP server's, which
hands the model to an engine process) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "__version__"]

_LAZY = {
    "LLM": ".engine.llm",
    "SamplingParams": ".sampling_params",
    "EngineConfig": ".config",
    "RequestOutput": ".engine.outputs",
    "CompletionOutput": ".engine.outputs",
}

if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine.llm import LLM
    from .engine.outputs import CompletionOutput, RequestOutput
    from .sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
