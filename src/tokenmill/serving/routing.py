"""Routing rules for the `auto` model: what is known of a request before it reaches a model (prompt length,
max_tokens, headers, metadata tags, a cheap difficulty score), and first-match rules over it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_CODE = re.compile(r"```|\bdef |\bclass |\breturn\b|#include|\bfunction\b|=>|;\s*$|\{\s*$", re.MULTILINE)
_MATH = re.compile(r"\d+\s*[-+*/^=]\s*\d+|\\frac|\\sum|\bintegral\b|\bderivative\b|\bprove\b|\btheorem\b", re.I)
_REASONING = re.compile(r"\b(why|explain|analy[sz]e|compare|step by step|reason|design|trade-?offs?|evaluate|"
                        r"justify|optimi[sz]e|debug|refactor)\b", re.I)


def difficulty_score(text: str, prompt_tokens: int) -> float:
    """A cheap 0..1 guess at how hard a prompt is: longer prompts, code, maths and reasoning words score higher.
    It costs a few regex scans, so it can run on every request; it is a heuristic for routing, not a model."""
    length = min(prompt_tokens / 1024.0, 1.0)
    code = min(len(_CODE.findall(text)) / 4.0, 1.0)
    math = min(len(_MATH.findall(text)) / 3.0, 1.0)
    reasoning = min(len(_REASONING.findall(text)) / 3.0, 1.0)
    questions = min(text.count("?") / 4.0, 1.0)
    return round(0.30 * length + 0.25 * code + 0.20 * math + 0.15 * reasoning + 0.10 * questions, 4)


@dataclass
class RequestFeatures:
    prompt_tokens: int
    max_tokens: int | None
    headers: dict[str, str]  # lower-case names
    metadata: dict[str, str]
    difficulty: float

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens, "difficulty": self.difficulty}


@dataclass
class RouteRule:
    """Sends a request to `model` when every condition given holds (unset conditions match anything).
    `header`/`metadata` map a name to a required value, or to "*" for "present with any value"."""

    model: str
    name: str | None = None
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    min_max_tokens: int | None = None
    max_max_tokens: int | None = None
    min_difficulty: float | None = None
    max_difficulty: float | None = None
    header: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.header = {str(k).lower(): str(v) for k, v in (self.header or {}).items()}
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}
        if self.name is None:
            self.name = f"rule-{self.model}"
        for lo, hi in (("min_prompt_tokens", "max_prompt_tokens"), ("min_max_tokens", "max_max_tokens"),
                       ("min_difficulty", "max_difficulty")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"routing rule {self.name}: {lo} ({a}) is above {hi} ({b})")

    def matches(self, f: RequestFeatures) -> bool:
        def within(value: float | None, lo: float | None, hi: float | None) -> bool:
            if lo is None and hi is None:
                return True
            if value is None:
                return False
            return (lo is None or value >= lo) and (hi is None or value <= hi)

        if not within(f.prompt_tokens, self.min_prompt_tokens, self.max_prompt_tokens):
            return False
        if not within(f.max_tokens, self.min_max_tokens, self.max_max_tokens):
            return False
        if not within(f.difficulty, self.min_difficulty, self.max_difficulty):
            return False
        for source, wanted in ((f.headers, self.header), (f.metadata, self.metadata)):
            for k, v in wanted.items():
                if k not in source or (v != "*" and source[k] != v):
                    return False
        return True


@dataclass
class RouterConfig:
    """The virtual model `name`: the first matching rule picks the model, else `default`."""

    default: str
    name: str = "auto"
    rules: list[RouteRule] = field(default_factory=list)

    def route(self, features: RequestFeatures) -> tuple[str, str]:
        """(model name, rule name or "default")."""
        for rule in self.rules:
            if rule.matches(features):
                return rule.model, rule.name or rule.model
        return self.default, "default"
