"""Engine logprobs (per token: {token_id: logprob} holding the top-N and the sampled token) in the two OpenAI shapes:
the legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset) and the chat shape (content: a list
of {token, logprob, bytes, top_logprobs})."""
from __future__ import annotations

import functools
from typing import Any

from ..engine.outputs import RequestOutput
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

_FLOOR = -9999.0  # JSON has no -inf


def _finite(x: float) -> float:
    return x if x > _FLOOR else _FLOOR


def _by_logprob(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)


class LogprobFormatter:
    def __init__(self, tokenizer: Any) -> None:
        decode = tokenizer.decode

        @functools.lru_cache(maxsize=65536)
        def token_str(token_id: int) -> str:
            return decode([token_id], skip_special_tokens=False)

        self.token_str = token_str

    def chat(self, ids: list[int], lps: list[dict[int, float]] | None, top: int) -> dict:
        """Chat shape; `top` alternatives per token (most likely first)."""
        tok = self.token_str
        content = []
        for tid, entry in zip(ids, lps or []):
            s = tok(tid)
            content.append(ChatTokenLogprob(
                token=s, logprob=_finite(entry.get(tid, _FLOOR)), bytes=list(s.encode("utf-8")),
                top_logprobs=[TopLogprob(token=tok(t), logprob=_finite(v), bytes=list(tok(t).encode("utf-8")))
                              for t, v in _by_logprob(entry)[:top]],
            ))
        return ChatLogprobs(content=content).model_dump()

    def tokens(self, ids: list[int], lps: list[dict[int, float]], top: int, offset: int) -> CompletionLogprobs:
        """Legacy shape for generated tokens; `offset` is the text offset of the first one. top_logprobs holds the
        engine's top-N plus the sampled token."""
        tok = self.token_str
        out = CompletionLogprobs()
        for tid, entry in zip(ids, lps):
            s = tok(tid)
            out.tokens.append(s)
            out.token_logprobs.append(_finite(entry.get(tid, _FLOOR)))
            out.top_logprobs.append({tok(t): _finite(v) for t, v in _by_logprob(entry)})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def prompt(self, out: RequestOutput, top: int) -> CompletionLogprobs:
        """Legacy shape for the prompt (echo): the first token has no logprob."""
        tok = self.token_str
        lp = CompletionLogprobs()
        offset = 0
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        for tid, entry in zip(out.prompt_token_ids, entries):
            s = tok(tid)
            lp.tokens.append(s)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                lp.token_logprobs.append(_finite(entry.get(tid, _FLOOR)))
                lp.top_logprobs.append({tok(t): _finite(v) for t, v in _by_logprob(entry)})
            lp.text_offset.append(offset)
            offset += len(s)
        return lp


def concat_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)
