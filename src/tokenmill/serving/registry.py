"""Several models in one server: their configuration (a models.yaml, or one model from the command line), their
share of the KV-cache memory budget, aliases, the `auto` router and fallback when a model is full or unhealthy.

models.yaml:

    memory_budget: 2GiB          # KV-cache bytes shared by the models below (a model's `memory` is a fraction of it)
    default: small               # the model for requests that name none (default: the first)
    response_cache: {backend: memory, max_bytes: 64MiB, ttl_s: 600}    # or backend: redis://127.0.0.1:6379/0
    router:                      # the virtual model `auto`: first matching rule wins, else its default
      name: auto
      default: small
      rules:
        - {name: long, model: large, min_prompt_tokens: 512}
        - {name: premium, model: large, header: {x-tier: premium}}
        - {name: code, model: large, metadata: {task: code}}
        - {name: hard, model: large, min_difficulty: 0.5}
    models:
      - name: small
        model: /models/small     # a HF directory or .gguf file; omitted = the embedded SmolLM2
        aliases: [cheap]
        memory: 0.25             # or bytes: 256MiB
        max_queued_requests: 64
        fallback: large          # where requests go when this model is full or unhealthy
        engine: {dtype: bfloat16, max_num_seqs: 32}    # any EngineConfig field
      - name: large
        model: /models/large
        memory: 0.75
    monitor: {ttft_high_s: 2.0}  # MonitorThresholds fields
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..config import EngineConfig
from .errors import APIError, validation_error
from .metrics import ModelMetrics
from .monitor import MonitorThresholds
from .openai_serving import OpenAIServing
from .protocol import ChatCompletionRequest, CompletionRequest
from .response_cache import ResponseCacheConfig
from .routing import RequestFeatures, RouteRule, RouterConfig, difficulty_score

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig) if f.init}


def served_model_name(model: str | None) -> str:
    """The name clients use: the model directory's or file's basename, or SmolLM2-135M-Instruct by default."""
    if model is None:
        return DEFAULT_MODEL_NAME
    return os.path.basename(os.path.normpath(os.path.expanduser(model))) or DEFAULT_MODEL_NAME


@dataclass
class ModelSpec:
    """One served model: its name, engine configuration, memory share, queue bound and fallback."""

    name: str
    engine: EngineConfig
    aliases: list[str] = field(default_factory=list)
    memory: float | int | None = None  # float in (0, 1]: fraction of the registry's memory_budget; int: bytes
    max_queued_requests: int | None = 256
    request_timeout: float | None = None
    fallback: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a model needs a non-empty name, got {self.name!r}")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"model {self.name}: max_queued_requests must be at least 1, got {self.max_queued_requests}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"model {self.name}: request_timeout must be positive, got {self.request_timeout}")
        if isinstance(self.memory, float) and not 0.0 < self.memory <= 1.0:
            raise ValueError(f"model {self.name}: memory as a fraction must be in (0, 1], got {self.memory}")
        if isinstance(self.memory, int) and self.memory < 2**20:
            raise ValueError(f"model {self.name}: memory {self.memory} is read as bytes, too few for a KV cache; "
                             f"write a fraction of memory_budget as a decimal (1.0, 0.5) or a size (512MiB)")


@dataclass
class RegistryConfig:
    models: list[ModelSpec]
    default: str | None = None
    router: RouterConfig | None = None
    memory_budget: int | None = None  # bytes of KV cache shared by the models with a fractional `memory`
    response_cache: ResponseCacheConfig = field(default_factory=ResponseCacheConfig)
    monitor: MonitorThresholds = field(default_factory=MonitorThresholds)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("the configuration names no models")
        names: dict[str, str] = {}
        for m in self.models:
            for n in (m.name, *m.aliases):
                if n in names:
                    raise ValueError(f"the model name or alias {n!r} is used twice ({names[n]} and {m.name})")
                names[n] = m.name
        if self.router is not None and self.router.name in names:
            raise ValueError(f"the router's name {self.router.name!r} is also a model name or alias")
        self.default = names.get(self.default or self.models[0].name)
        if self.default is None:
            raise ValueError(f"the default model is not one of the models: {', '.join(m.name for m in self.models)}")
        known = ", ".join(sorted(names))
        for m in self.models:
            if m.fallback is not None:
                if m.fallback not in names:
                    raise ValueError(f"model {m.name}: fallback {m.fallback!r} is not a model (known: {known})")
                m.fallback = names[m.fallback]
                if m.fallback == m.name:
                    raise ValueError(f"model {m.name} cannot be its own fallback")
        if self.router is not None:
            for rule in [*self.router.rules, RouteRule(model=self.router.default, name="default")]:
                if rule.model not in names:
                    raise ValueError(f"routing rule {rule.name}: model {rule.model!r} is not a model (known: {known})")
                rule.model = names[rule.model]
            self.router.default = names[self.router.default]
        fractions = [m for m in self.models if isinstance(m.memory, float)]
        if fractions and self.memory_budget is None:
            raise ValueError(f"model {fractions[0].name} asks for a fraction of memory_budget, which is not set")
        if sum(m.memory for m in fractions) > 1.0 + 1e-9:
            raise ValueError("the models' memory fractions add up to more than 1")
        for m in self.models:  # the memory share becomes the engine's KV-cache budget
            if m.memory is not None:
                nbytes = int(m.memory * self.memory_budget) if isinstance(m.memory, float) else m.memory
                m.engine = dataclasses.replace(m.engine, kv_cache_bytes=nbytes)
        if len(self.models) > 1:
            # Engines whose thread pools together oversubscribe the cores stall each other (spinning OpenMP
            # workers): on 2 cores, two busy SmolLM2 engines with 2 threads each made 112 output tok/s in all,
            # with 1 thread each 286. So models without num_threads share the cores out.
            share = max(1, _num_cores() // len(self.models))
            for m in self.models:
                if m.engine.num_threads is None:
                    m.engine = dataclasses.replace(m.engine, num_threads=share)

    @classmethod
    def single(cls, engine: EngineConfig, name: str | None = None, max_queued_requests: int | None = 256,
               request_timeout: float | None = None, response_cache: ResponseCacheConfig | None = None) -> "RegistryConfig":
        """One model from the command line (`tokenmill serve --model ...`)."""
        spec = ModelSpec(name or served_model_name(engine.model), engine, max_queued_requests=max_queued_requests,
                         request_timeout=request_timeout)
        return cls([spec], response_cache=response_cache or ResponseCacheConfig())

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "RegistryConfig":
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such models config: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with a `models` list at the top")
        base = os.path.dirname(os.path.abspath(path))
        return cls.from_dict(data, base_dir=base, overrides=overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str = ".", overrides: dict[str, Any] | None = None
                  ) -> "RegistryConfig":
        """`overrides`: EngineConfig fields applied to every model unless the model sets them (e.g. --dtype)."""
        _check_keys("the models config", data, {"models", "default", "router", "memory_budget", "response_cache",
                                                 "monitor"})
        models_data = data.get("models")
        if not isinstance(models_data, list) or not models_data:
            raise ValueError("the models config needs a non-empty `models` list")
        models = [_model_spec(m, base_dir, overrides or {}) for m in models_data]
        router = None
        if data.get("router") is not None:
            r = data["router"]
            if not isinstance(r, dict):
                raise ValueError("`router` must be a mapping with `default` and `rules`")
            _check_keys("router", r, {"name", "default", "rules"})
            rules = []
            for i, rd in enumerate(r.get("rules") or []):
                if not isinstance(rd, dict) or "model" not in rd:
                    raise ValueError(f"router rule {i}: a mapping with at least `model` is needed")
                _check_keys(f"router rule {i}", rd, {f.name for f in dataclasses.fields(RouteRule)})
                rules.append(RouteRule(**rd))
            router = RouterConfig(default=r.get("default") or data.get("default") or models[0].name,
                                  name=r.get("name", "auto"), rules=rules)
        rc = data.get("response_cache") or {}
        if isinstance(rc, str):
            rc = {"backend": rc}
        _check_keys("response_cache", rc, {"backend", "max_bytes", "ttl_s"})
        if "max_bytes" in rc:
            rc["max_bytes"] = parse_size(rc["max_bytes"])
        mon = data.get("monitor") or {}
        _check_keys("monitor", mon, {f.name for f in dataclasses.fields(MonitorThresholds)})
        budget = data.get("memory_budget")
        return cls(models=models, default=data.get("default"), router=router,
                   memory_budget=parse_size(budget) if budget is not None else None,
                   response_cache=ResponseCacheConfig(**rc), monitor=MonitorThresholds(**mon))


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string such as 64MiB, 1GB, 512k."""
    if isinstance(value, int):
        return value
    s = str(value).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    low = s.lower()
    for unit in sorted(units, key=len, reverse=True):
        if low.endswith(unit):
            number = low[: -len(unit)].strip()
            try:
                return int(float(number) * units[unit])
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"not a size in bytes: {value!r} (use e.g. 67108864, 64MiB or 1GB)") from None


def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_keys(where: str, d: dict, allowed: set[str]) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _model_spec(d: Any, base_dir: str, overrides: dict[str, Any]) -> ModelSpec:
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"each entry of `models` needs at least a `name`, got {d!r}")
    _check_keys(f"model {d['name']}", d, {"name", "model", "aliases", "memory", "max_queued_requests",
                                           "request_timeout", "fallback", "engine"})
    engine = dict(d.get("engine") or {})
    bad = sorted(set(engine) - _ENGINE_FIELDS)
    if bad:
        raise ValueError(f"model {d['name']}: unknown engine option(s) {', '.join(bad)}")
    for k, v in overrides.items():
        engine.setdefault(k, v)
    path = d.get("model")
    if path is not None:
        path = os.path.expanduser(str(path))
        if not os.path.isabs(path) and os.path.exists(os.path.join(base_dir, path)):
            path = os.path.join(base_dir, path)
    for key in ("kv_cache_bytes",):
        if isinstance(engine.get(key), str):
            engine[key] = parse_size(engine[key])
    memory = d.get("memory")
    if isinstance(memory, str):
        memory = parse_size(memory)
    aliases = d.get("aliases") or []
    if isinstance(aliases, str):
        aliases = [aliases]
    return ModelSpec(name=str(d["name"]), engine=EngineConfig(model=path, **engine), aliases=[str(a) for a in aliases],
                     memory=memory, max_queued_requests=d.get("max_queued_requests", 256),
                     request_timeout=d.get("request_timeout"), fallback=d.get("fallback"))


# ---- the running models -----------------------------------------------------------------------------------------
class ServedModel:
    """One model at run time: its engine (None while loading), its OpenAI endpoints and its metrics."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.engine: Any = None  # ProcessEngine / AsyncEngine
        self.serving: OpenAIServing | None = None
        self.metrics: ModelMetrics | None = None
        self.load_error: str | None = None
        self.draining = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        if self.engine is None or not self.engine.is_ready or self.serving is None:
            return "loading"
        if self.engine.is_dead:
            return "dead"
        return "ok"

    def health(self) -> dict[str, Any]:
        stats = self.engine.stats() if self.engine is not None else {}
        error = self.load_error or (self.engine.dead_reason if self.engine is not None else None)
        return {"status": self.status, "error": error, "aliases": list(self.spec.aliases),
                "fallback": self.spec.fallback, "max_queued_requests": self.spec.max_queued_requests,
                "queue_depth": int(stats.get("num_waiting", 0)), "running": int(stats.get("num_running", 0)),
                "kv_cache_usage": float(stats.get("kv_cache_usage", 0.0)),
                "engine_pid": getattr(self.engine, "pid", None)}


class ModelRegistry:
    """Name and alias lookup, the `auto` router and the fallback chain; `handle` answers one API request."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.models: dict[str, ServedModel] = {s.name: ServedModel(s) for s in config.models}
        self._names: dict[str, str] = {n: s.name for s in config.models for n in (s.name, *s.aliases)}

    @property
    def default(self) -> ServedModel:
        return self.models[self.config.default]  # type: ignore[index]

    @property
    def router(self) -> RouterConfig | None:
        return self.config.router

    def resolve(self, name: str) -> ServedModel | None:
        real = self._names.get(name)
        return self.models[real] if real is not None else None

    def known_names(self) -> list[str]:
        return [*self._names, *([self.router.name] if self.router else [])]

    def chain(self, first: ServedModel) -> list[ServedModel]:
        """The model and its fallbacks, in order, each once."""
        out = [first]
        while out[-1].spec.fallback is not None and out[-1].spec.fallback not in {m.name for m in out}:
            out.append(self.models[out[-1].spec.fallback])
        return out

    # ---- requests -----------------------------------------------------------------------------------------
    async def handle(self, request: Any, kind: str) -> Any:
        """Parses the body, picks the model (explicit name, alias, `auto` rule or the default), and lets the first
        model of its fallback chain that can take the request answer it."""
        body = await request.body()
        model_cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        target, route = self.select(req, request.headers, kind)
        chain = self.chain(target)
        error: APIError | None = None
        for i, m in enumerate(chain):
            how = route if i == 0 else "fallback"
            if m.status != "ok" or m.serving is None:
                error = APIError(503, f"the model `{m.name}` is not available ({m.status})", code="unavailable",
                                 headers={"Retry-After": "2"})
                continue
            try:
                return await m.serving.handle(request, kind, req, how)
            except APIError as e:
                if e.code in ("queue_full", "unavailable") and i + 1 < len(chain):
                    logger.info("model %s cannot take the request (%s); falling back to %s", m.name, e.code,
                                chain[i + 1].name)
                    error = e
                    continue
                raise
        assert error is not None
        raise error

    def select(self, req: Any, headers: Any, kind: str) -> tuple[ServedModel, str]:
        requested = req.model
        if requested is None:
            return self.default, "default"
        if self.router is not None and requested == self.router.name:
            features = self.features(req, headers, kind)
            name, rule = self.router.route(features)
            logger.debug("routed to %s by %s (%s)", name, rule, features.as_dict())
            return self.models[name], rule
        m = self.resolve(requested)
        if m is None:
            raise APIError(404, f"the model `{requested}` does not exist; known models: "
                                f"{', '.join(self.known_names())}", param="model", code="model_not_found")
        return m, "explicit" if requested == m.name else "alias"

    def features(self, req: Any, headers: Any, kind: str) -> RequestFeatures:
        """What the routing rules look at. Prompt tokens are counted with the router default's tokenizer (for chat:
        the messages' text, without the template)."""
        if kind == "chat":
            texts = []
            for msg in req.messages:
                c = msg.content
                texts.append(c if isinstance(c, str) else " ".join(p.text for p in c or []))
            text = "\n".join(texts)
            ids = None
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        else:
            p, text, ids = req.prompt, "", None
            if isinstance(p, str):
                text = p
            elif p and isinstance(p[0], str):
                text = "\n".join(p)
            elif p and isinstance(p[0], int):
                ids = len(p)
            else:  # several token-id prompts: the longest decides
                ids = max((len(x) for x in p), default=0)
            max_tokens = req.max_tokens
        if ids is None:
            tok = next((m.engine.tokenizer for m in (self.models[self.router.default] if self.router else
                                                     self.default, *self.models.values())
                        if m.engine is not None and m.status == "ok"), None)
            ids = len(tok.encode(text, False)) if tok is not None else max(1, len(text) // 4)
        hdrs = {k.lower(): v for k, v in headers.items()}
        return RequestFeatures(prompt_tokens=ids, max_tokens=max_tokens, headers=hdrs,
                               metadata=dict(req.metadata or {}), difficulty=difficulty_score(text, ids))
