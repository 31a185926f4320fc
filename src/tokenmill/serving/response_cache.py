"""Exact-match response cache for deterministic requests (greedy, or sampled with an explicit seed).

The key is a SHA-256 over the model name, the endpoint kind, the token ids of every rendered prompt and every
field that changes the output (all of SamplingParams but `timeout`, plus echo/logprobs shape); the value is the
JSON body of the non-streaming response. Streaming requests are replayed from the same entry.

Backends: `memory` (in-process LRU bounded in bytes and entries' age) and `redis://host:port/db` (shared by
replicas; entries carry the TTL as a Redis expiry; the byte bound is Redis's own `maxmemory` with an LRU policy,
which is how Redis bounds a cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)

KEY_VERSION = "v1"
_IGNORED_PARAMS = {"timeout", "stop_strings"}  # SamplingParams fields that never change the output, or are derived


def is_cacheable(params: SamplingParams) -> bool:
    """Only requests whose output is a function of the request: greedy, or sampled with an explicit seed."""
    return params.greedy or params.seed is not None


def cache_key(model: str, kind: str, prompts: list[list[int]], params: SamplingParams, **shape: Any) -> str:
    """A stable key for one request: the same model, prompts, sampling fields and response shape give the same
    key in every process."""
    fields = {k: v for k, v in dataclasses.asdict(params).items() if k not in _IGNORED_PARAMS}
    payload = json.dumps({"v": KEY_VERSION, "model": model, "kind": kind, "prompts": prompts, "params": fields,
                          "shape": shape}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ResponseCacheConfig:
    backend: str = "memory"  # "memory", "off", or a redis:// URL
    max_bytes: int = 64 * 2**20
    ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.backend not in ("memory", "off") and not self.backend.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"response cache must be 'memory', 'off' or a redis:// URL, got {self.backend!r}")
        if self.max_bytes < 1:
            raise ValueError(f"response cache max_bytes must be positive, got {self.max_bytes}")
        if not self.ttl_s > 0:
            raise ValueError(f"response cache ttl must be positive seconds, got {self.ttl_s}")


class ResponseCache:
    """The interface the server uses; `create_response_cache` picks the backend."""

    backend_name = "none"

    def __init__(self, config: ResponseCacheConfig) -> None:
        self.config = config
        self.hits = 0
        self.misses = 0

    async def get(self, key: str) -> dict | None:
        value = await self._get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    async def put(self, key: str, value: dict) -> None:
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > self.config.max_bytes:
            return  # larger than the whole cache: not worth evicting everything else for
        await self._put(key, data)

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "evictions": 0, "bytes": 0, "entries": 0}

    async def _get(self, key: str) -> dict | None:
        raise NotImplementedError

    async def _put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class MemoryResponseCache(ResponseCache):
    """In-process LRU: at most `max_bytes` of serialised responses, each for at most `ttl_s` seconds."""

    backend_name = "memory"

    def __init__(self, config: ResponseCacheConfig) -> None:
        super().__init__(config)
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expiry, data)
        self._bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def _size(self, key: str, data: bytes) -> int:
        return len(key) + len(data)

    def _drop(self, key: str) -> None:
        _, data = self._entries.pop(key)
        self._bytes -= self._size(key, data)

    async def _get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expiry, data = entry
            if expiry <= time.monotonic():
                self._drop(key)
                self.evictions += 1
                return None
            self._entries.move_to_end(key)
        return json.loads(data)

    async def _put(self, key: str, data: bytes) -> None:
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (time.monotonic() + self.config.ttl_s, data)
            self._bytes += self._size(key, data)
            while self._bytes > self.config.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "bytes": self._bytes,
                "entries": len(self._entries)}


class RedisResponseCache(ResponseCache):
    """Entries in Redis under `tokenmill:rc:<key>` with the TTL as their expiry, shared by every server pointed at
    the same Redis. Redis errors never fail a request: they count as misses and are logged."""

    backend_name = "redis"
    PREFIX = "tokenmill:rc:"

    def __init__(self, config: ResponseCacheConfig) -> None:
        super().__init__(config)
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ValueError("the redis response cache needs the `redis` package: pip install redis") from None
        self._client = aioredis.from_url(config.backend, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.errors = 0
        self._bytes = 0
        self._entries = 0
        self._evicted = 0.0
        self._stats_at = 0.0

    async def ping(self) -> None:
        await self._client.ping()

    async def _get(self, key: str) -> dict | None:
        try:
            data = await self._client.get(self.PREFIX + key)
        except Exception as e:
            self._error(e)
            return None
        return json.loads(data) if data is not None else None

    async def _put(self, key: str, data: bytes) -> None:
        try:
            await self._client.set(self.PREFIX + key, data, px=int(self.config.ttl_s * 1000))
        except Exception as e:
            self._error(e)

    def _error(self, e: Exception) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 100 == 0:
            logger.warning("response cache: redis error (%d so far): %s", self.errors, e)

    async def refresh_stats(self) -> None:
        """Entries and bytes under our prefix, evictions from Redis's own counters (at most once a second)."""
        now = time.monotonic()
        if now - self._stats_at < 1.0:
            return
        self._stats_at = now
        try:
            info = await self._client.info("stats")
            self._evicted = float(info.get("evicted_keys", 0)) + float(info.get("expired_keys", 0))
            n = nbytes = 0
            async for k in self._client.scan_iter(match=self.PREFIX + "*", count=500):
                n += 1
                nbytes += (await self._client.memory_usage(k)) or 0
                if n >= 10_000:  # an estimate is enough for a gauge
                    break
            self._entries, self._bytes = n, nbytes
        except Exception as e:
            self._error(e)

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self._evicted,
                "bytes": self._bytes, "entries": self._entries}

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:
            pass


def create_response_cache(config: ResponseCacheConfig) -> ResponseCache | None:
    if config.backend == "off":
        return None
    if config.backend == "memory":
        return MemoryResponseCache(config)
    return RedisResponseCache(config)


# ---- replay -----------------------------------------------------------------------------------------------------
def cached_usage(usage: dict) -> dict:
    """The usage of a cached answer: the whole prompt counts as cached tokens."""
    out = dict(usage)
    out["prompt_tokens_details"] = {"cached_tokens": usage.get("prompt_tokens", 0)}
    return out


def replay_chunks(body: dict, include_usage: bool) -> list[dict]:
    """A cached (non-streaming) response body as the stream chunks a client would have received: for chat the
    role first, then each choice's content and finish reason; then the usage chunk when asked for."""
    chat = body["object"] == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {k: body[k] for k in ("id", "created", "model")}
    chunks: list[dict] = []

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        c = {**head, "object": obj, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return c

    if chat:
        chunks.append(chunk([{"index": ch["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for ch in body["choices"]]))
        for ch in body["choices"]:
            chunks.append(chunk([{"index": ch["index"], "delta": {"content": ch["message"]["content"]},
                                  "logprobs": ch.get("logprobs"), "finish_reason": ch["finish_reason"],
                                  "stop_reason": ch.get("stop_reason")}]))
    else:
        for ch in body["choices"]:
            chunks.append(chunk([{"index": ch["index"], "text": ch["text"], "logprobs": ch.get("logprobs"),
                                  "finish_reason": ch["finish_reason"], "stop_reason": ch.get("stop_reason")}]))
    if include_usage:
        chunks.append(chunk([], body["usage"]))
    return chunks

