"""Which layers get which weight format: presets and per-layer policy files.

A policy maps module names of our model (``embed_tokens``, ``lm_head``, ``layers.3.self_attn.qkv_proj``,
``layers.3.self_attn.o_proj``, ``layers.3.mlp.gate_up_proj``, ``layers.3.mlp.down_proj``) to ``bf16`` (keep the
model dtype), ``int8`` or ``int4``. Rules are glob patterns, first match wins; ``first`` and ``last`` in a
pattern stand for the first and last block's index. A policy file is JSON::

    {"default": "int4", "group_size": 64, "awq": true,
     "rules": [["embed_tokens", "bf16"], ["lm_head", "bf16"], ["layers.first.*", "bf16"],
               ["*.self_attn.*", "int8"]]}
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field

from .weights import INT4_GROUP_SIZES

WEIGHT_FORMATS = ("bf16", "int8", "int4")


@dataclass
class QuantPolicy:
    default: str = "bf16"
    group_size: int = 32
    rules: list[tuple[str, str]] = field(default_factory=list)
    awq: bool = False  # activation-aware scales for the int4 layers (needs calibration: `tokenmill quantize`)
    name: str = "custom"

    def __post_init__(self) -> None:
        self.rules = [tuple(r) for r in self.rules]
        for fmt in [self.default, *(m for _, m in self.rules)]:
            if fmt not in WEIGHT_FORMATS:
                raise ValueError(f"unknown weight format {fmt!r} in quantisation policy; expected one of {WEIGHT_FORMATS}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")

    def format_for(self, module_name: str, num_layers: int) -> str:
        for pattern, fmt in self.rules:
            pat = pattern.replace("layers.first.", "layers.0.").replace("layers.last.", f"layers.{num_layers - 1}.")
            if fnmatch.fnmatchcase(module_name, pat):
                return fmt
        return self.default

    def to_dict(self) -> dict:
        return {"name": self.name, "default": self.default, "group_size": self.group_size,
                "rules": [list(r) for r in self.rules], "awq": self.awq}


PRESETS = {
    "int8": dict(default="int8"),
    "int4": dict(default="int4"),
    "int4-awq": dict(default="int4", awq=True),
    # embeddings, head, first and last block in bf16; attention int8; MLP int4 (AWQ when calibrated)
    "mixed": dict(
        default="bf16",
        awq=True,
        rules=[("embed_tokens", "bf16"), ("lm_head", "bf16"), ("layers.first.*", "bf16"), ("layers.last.*", "bf16"),
               ("*.self_attn.*", "int8"), ("*.mlp.*", "int4")],
    ),
}


def resolve_policy(spec: str, group_size: int | None = None) -> QuantPolicy:
    """A preset name (int8, int4, int4-awq, mixed) or the path of a JSON policy file."""
    if spec in PRESETS:
        kw = dict(PRESETS[spec])
        if group_size is not None:
            kw["group_size"] = group_size
        return QuantPolicy(name=spec, **kw)
    if spec.endswith(".json") or os.path.isfile(spec):
        try:
            with open(spec) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read quantisation policy file {spec!r}: {e}") from e
        if group_size is not None:
            data["group_size"] = group_size
        data.setdefault("name", os.path.basename(spec))
        try:
            return QuantPolicy(**data)
        except TypeError as e:
            raise ValueError(f"bad quantisation policy file {spec!r}: {e}") from e
    raise ValueError(
        f"unknown quantisation method {spec!r}; expected one of {', '.join(PRESETS)}, 'gguf', or a policy .json file"
    )
