"""`tokenmill quantize`: load a float checkpoint, calibrate (AWQ) if the method asks for it, quantise, and write a
checkpoint that `tokenmill serve --model DIR` loads directly, so calibration runs once."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..config import torch_dtype
from ..model.loader import iter_weights, load_model_config
from ..model.paths import resolve_model_path
from ..model.registry import model_class
from ..model.tokenizer import Tokenizer
from .apply import cast_float_weights, quantize_model, weight_bytes_by_part
from .awq import apply_awq
from .calibration import calibration_samples
from .checkpoint import save_quantized_checkpoint
from .policy import resolve_policy

logger = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    out_dir: str
    layout: dict
    weight_bytes: dict[str, int]
    float_weight_bytes: dict[str, int]
    awq_report: dict[str, dict[str, float]]
    seconds: float


def load_float_model(model: str | None, dtype: torch.dtype = torch.float32):
    path = resolve_model_path(model)
    cfg = load_model_config(path)
    with torch.device("cpu"):
        m = model_class(cfg)(cfg)
    m = m.to(dtype)
    m.load_weights(iter_weights(path))
    return m.eval(), cfg, path


def quantize_checkpoint(model: str | None, method: str, out_dir: str, group_size: int | None = None,
                        calibration_samples_n: int = 32, calibration_seq_len: int = 512,
                        dtype: str = "bfloat16") -> QuantizeResult:
    """Quantises `model` (HF dir, GGUF or None for the embedded default) with `method` (preset or policy file)."""
    if method == "gguf":
        raise ValueError("'gguf' keeps a GGUF file's own blocks at load time (serve --quantization gguf); "
                         "it is not a quantize method")
    policy = resolve_policy(method, group_size)
    float_dtype = torch_dtype(dtype)  # a clear error before the long work
    t0 = time.perf_counter()
    # calibration and scaling in float32, so folding scales into norms loses nothing
    m, cfg, path = load_float_model(model, torch.float32)
    float_bytes = {k: v // 2 for k, v in weight_bytes_by_part(m).items()}  # as bf16
    tokenizer = Tokenizer.from_path(path)
    report: dict[str, dict[str, float]] = {}
    importance: dict[str, torch.Tensor] = {}
    calib = {}
    if policy.awq:
        from ..engine.model_runner import ModelRunner

        samples = calibration_samples(tokenizer.encode, calibration_samples_n, calibration_seq_len)
        runner = ModelRunner(m, cfg, torch.device("cpu"), torch.float32)
        awq = apply_awq(m, lambda ids: runner.prompt_logits(ids), samples, policy)  # all rows reach the head
        report, importance = awq.report, awq.importance
        calib = {"samples": len(samples), "seq_len": calibration_seq_len, "source": "ShareGPT V3 conversations 1000-3000"}
    layout = quantize_model(m, policy, importance)
    cast_float_weights(m, float_dtype)
    save_quantized_checkpoint(m, layout, out_dir, tokenizer, extra={"policy": policy.to_dict(), "calibration": calib})
    return QuantizeResult(out_dir, layout, weight_bytes_by_part(m), float_bytes, report, time.perf_counter() - t0)
