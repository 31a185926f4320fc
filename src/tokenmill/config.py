"""Engine and model configuration (validated dataclasses)."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the HTTP process reads these configs without it
    import torch

logger = logging.getLogger(__name__)

# accepted dtype names -> torch attribute names (torch_dtype() maps them)
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a name in DTYPES (ValueError naming the choices otherwise)."""
    import torch

    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(sorted(DTYPES))})") from None


KV_CACHE_DTYPES = ("auto", "int8")

_MODEL_TYPE_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder (our own names, from HF config or GGUF)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # per layer: None (full attention) or the window size in tokens
    sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows must have one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def param_counts(self) -> dict[str, int]:
        """Parameters by group: embeddings, attention (q/k/v/o and the QKV bias), MLP (gate/up/down), RMS norms
        (two per layer and the final one), lm_head (0 when tied to the embeddings)."""
        h, i, d, n = self.hidden_size, self.intermediate_size, self.head_dim, self.num_layers
        qkv_out = d * (self.num_heads + 2 * self.num_kv_heads)
        attn = h * qkv_out + self.num_heads * d * h + (qkv_out if self.attention_bias else 0)
        return {
            "embed_tokens": self.vocab_size * h,
            "attention": n * attn,
            "mlp": n * 3 * h * i,
            "norms": n * 2 * h + h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
        }

    @property
    def num_params(self) -> int:
        return sum(self.param_counts().values())

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV-cache bytes of one token; torch.int8 is the quantised cache: head_dim int8 values plus one float16
        scale per KV head, for keys and values."""
        import torch

        if dtype == torch.int8:
            return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + 2)
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        # configs saved without a model (config.save_pretrained) lack "architectures": infer it from model_type
        model_type = cfg.get("model_type", "unknown")
        archs = cfg.get("architectures") or [_MODEL_TYPE_ARCHS.get(model_type, model_type)]
        arch = archs[0]
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // n_heads
        # transformers >= 5 stores rope settings in rope_parameters; older configs use rope_theta/rope_scaling
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        if scaling:
            rope.update(scaling)
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        windows = sliding_windows_from_hf(cfg, n_layers)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        tie = cfg.get("tie_word_embeddings")
        if tie is None:
            tie = arch not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_windows=windows,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"model directory {path!r} has no config.json ({cfg_path})")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt config file {cfg_path}: {e}") from e
        return cls.from_hf_config(cfg)


def sliding_windows_from_hf(cfg: dict[str, Any], n_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if cfg.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in (cfg.get("architectures") or []):
        if not cfg.get("use_sliding_window", False):
            window = None
        if layer_types is None and window is not None:
            first = cfg.get("max_window_layers", n_layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if window is None:
        return [None] * n_layers
    if layer_types is None:
        return [int(window)] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in layer_types]


@dataclass
class CacheConfig:
    block_size: int = 16
    # Explicit KV-cache budget in bytes; if None, use `memory_fraction` of available memory.
    kv_cache_bytes: int | None = None
    # CPU: fraction of currently available RAM; CUDA: fraction of total device memory for
    # weights + activations + KV cache (the KV cache gets what is left after a warm-up pass).
    memory_fraction: float = 0.3
    num_blocks: int | None = None  # overrides the budget (tests)
    enable_prefix_caching: bool = True
    # Most KV bytes the prefix cache keeps in blocks no running sequence uses (least recently used go first).
    # None: unbounded on CUDA (the cache is allocated up front); on CPU, where a block's memory becomes resident
    # when it is first written, model_runner.CPU_DEFAULT_PREFIX_CACHE_BYTES.
    prefix_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


SPEC_METHODS = ("ngram", "draft", "self")
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    """Speculative decoding: `method` None is off. k = num_speculative_tokens is the most tokens proposed per step
    (adaptive k lowers it per sequence); no sequence speculates while more than `disable_by_batch_size` run.
    `max_verify_rows` caps the decode rows of a step (each speculating sequence's 1 + k, 1 for the others): None
    means 8 where the linears run the CPU small-row bf16 kernel (1 to 8 rows in the time of one), else no cap."""

    method: str | None = None
    num_speculative_tokens: int = 7
    model: str | None = None  # the draft model ("draft")
    draft_layers: int | None = None  # K of the self-speculative draft (default: a quarter of the layers)
    disable_by_batch_size: int = 8
    max_verify_rows: int | None = None
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.model is not None and self.method is None:
            self.method = "draft"
        if self.method is not None and self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPEC_METHODS)}; got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative_method 'draft' needs speculative_model (a model sharing the tokenizer)")
        if self.model is not None and self.method != "draft":
            raise ValueError(f"speculative_model is used only by speculative_method 'draft', not {self.method!r}")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise ValueError(f"speculative_draft_layers must be >= 1, got {self.draft_layers}")
        if self.disable_by_batch_size < 1:
            raise ValueError(f"speculative_disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")
        if self.max_verify_rows is not None and self.max_verify_rows < 2:
            raise ValueError(f"speculative_max_verify_rows must be >= 2 (one sequence and one proposed token), "
                             f"got {self.max_verify_rows}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= speculative_ngram_min <= speculative_ngram_max, got {self.ngram_min}, "
                             f"{self.ngram_max}")


@dataclass
class EngineConfig:
    """Everything the engine needs to start. `model` is a HF directory or a .gguf file; None means
    the embedded SmolLM2-135M-Instruct."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    kv_cache_bytes: int | None = None
    memory_fraction: float = 0.3
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    prefix_cache_bytes: int | None = None  # see CacheConfig
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    num_threads: int | None = None
    # CUDA: decode steps replay CUDA graphs captured at start-up (engine/cuda_graphs.py) unless this is set
    enforce_eager: bool = False
    # Overlap each decode step's host work (schedule, inputs, detokenise) with the previous step's GPU work: a step
    # is launched before the previous step's sampled tokens reach the host (engine/async_step.py). None = on for
    # CUDA, off on CPU (where the host is the device and nothing overlaps).
    async_scheduling: bool | None = None
    # KV-cache storage: "auto" = the model dtype, "int8" = int8 values with a float16 scale per token per KV head
    kv_cache_dtype: str = "auto"
    # StreamingLLM-style attention: each token sees the first kv_sinks tokens and the last kv_window ones; blocks in
    # between are freed, so a sequence may run past max_model_len with bounded KV use. None = full attention.
    kv_window: int | None = None
    kv_sinks: int = 4
    # weight quantisation at load time: a preset (int8, int4, int4-awq, mixed), a policy .json file, or "gguf"
    # (a GGUF file's own Q4_0/Q4_1/Q8_0 tensors loaded as int4/int8 without dequantising); None = model dtype.
    # A directory written by `tokenmill quantize` is quantised already and needs nothing here.
    quantization: str | None = None
    # speculative decoding (off by default): "ngram" (prompt lookup), "draft" (speculative_model), "self" (the
    # target's first speculative_draft_layers layers); see SpeculativeConfig
    speculative_method: str | None = None
    num_speculative_tokens: int = 7
    speculative_model: str | None = None
    speculative_draft_layers: int | None = None
    speculative_disable_by_batch_size: int = 8
    speculative_max_verify_rows: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.quantization is not None and self.quantization != "gguf":
            from .quant.policy import resolve_policy

            resolve_policy(self.quantization)  # unknown names fail here, before any loading
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.kv_window is not None and self.kv_window < 1:
            raise ValueError(f"kv_window must be >= 1 (tokens), got {self.kv_window}")
        if self.kv_sinks < 0:
            raise ValueError(f"kv_sinks must be >= 0, got {self.kv_sinks}")
        if self.async_scheduling and self.speculative_method:
            raise ValueError("async_scheduling does not combine with speculative decoding (speculative_method)")
        self.cache = CacheConfig(
            block_size=self.block_size,
            kv_cache_bytes=self.kv_cache_bytes,
            memory_fraction=self.memory_fraction,
            num_blocks=self.num_blocks,
            enable_prefix_caching=self.enable_prefix_caching,
            prefix_cache_bytes=self.prefix_cache_bytes,
        )
        self.scheduler = SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs)
        self.speculative = SpeculativeConfig(
            method=self.speculative_method,
            num_speculative_tokens=self.num_speculative_tokens,
            model=self.speculative_model,
            draft_layers=self.speculative_draft_layers,
            disable_by_batch_size=self.speculative_disable_by_batch_size,
            max_verify_rows=self.speculative_max_verify_rows,
        )

    def resolve_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:  # tensors report cuda:0; keep comparisons equal
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def resolve_async_scheduling(self, device: torch.device) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return device.type == "cuda" and not self.speculative_method

    def resolve_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's storage dtype (torch.int8: the quantised format of kv_cache.py)."""
        import torch

        return torch.int8 if self.kv_cache_dtype == "int8" else model_dtype

    def resolve_dtype(self, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return torch_dtype(self.dtype)
        if device.type == "cpu":
            # bf16 matmuls are several times faster than fp32 on CPUs with AVX512-BF16/AMX; fp16 on CPU is slow.
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        name = str(model_cfg.torch_dtype).replace("torch.", "")
        ckpt = torch_dtype(name) if name in DTYPES else torch.bfloat16
        if ckpt == torch.float32:
            return torch.bfloat16
        return ckpt


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
