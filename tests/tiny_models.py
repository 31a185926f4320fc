"""Tiny random-weight Hugging Face checkpoints (with the SmolLM2 tokenizer) for equivalence tests."""
from __future__ import annotations

import os

import torch

VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaky distributions: greedy choices are far from ties
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":  # GQA, untied head, llama3 rope scaling
        return LlamaConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            **common,
        )
    if arch == "mistral":  # MQA, sliding window shorter than the prompts
        return MistralConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False, **common)
    if arch == "qwen2":  # MHA, QKV bias, tied embeddings
        return Qwen2Config(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, **common)
    raise ValueError(arch)


def save_tiny_model(arch: str, path: str, tokenizer_dir: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    if arch == "qwen2":  # give the QKV biases non-zero values so loading them matters
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
            dst.write(src.read())
    return path
