"""Tokenizer wrapper (HF fast tokenizers, from a HF directory or a GGUF file), chat templates rendered
with a sandboxed jinja2 environment, and incremental detokenisation with stop strings."""
from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")

# Tokens of prompt context decoded together with the first generated tokens, so that the first
# token's leading space / merged bytes come out as in a full decode.
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens. Past this many pending
# tokens a trailing U+FFFD is taken to be real (invalid bytes) rather than an incomplete character.
_MAX_PENDING_TOKENS = 6
_REPLACEMENT = "\ufffd"


def tokenizer_cache_dir(gguf_path: str) -> str:
    """Where the tokenizer converted from a GGUF file is kept (keyed by the file's path, size and mtime).
    $TOKENMILL_CACHE_DIR, else $XDG_CACHE_HOME/tokenmill, else ~/.cache/tokenmill."""
    import hashlib

    st = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenmill"
    )
    return os.path.join(root, "tokenizers", key)


def _load_gguf_tokenizer(path: str) -> Any:
    """transformers rebuilds a GGUF's tokenizer in Python (~10 s for a 49k vocabulary); the result is saved once
    in a cache directory and loaded from its tokenizer.json afterwards (~0.3 s)."""
    from transformers import AutoTokenizer

    cache = tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception as e:  # a damaged cache entry: rebuild it
            logger.warning("ignoring the cached tokenizer in %s: %s", cache, e)
    try:
        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from GGUF file {path}: {e}") from e
    import shutil
    import tempfile

    tmp = None
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))
        hf.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError as e:  # read-only home, a concurrent writer won the rename, ...: just not cached
        logger.debug("tokenizer cache not written (%s)", e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return hf


class Tokenizer:
    """A Hugging Face fast tokenizer plus our own chat-template rendering."""

    def __init__(self, hf_tokenizer: Any, chat_template: str | None = None) -> None:
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ValueError(f"a fast (Rust `tokenizers`) tokenizer is required, got {type(hf_tokenizer).__name__}")
        self.hf = hf_tokenizer
        self.chat_template = chat_template
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = len(hf_tokenizer)

    @classmethod
    def from_path(cls, path: str) -> "Tokenizer":
        """Load from a HF directory (tokenizer.json etc.) or a .gguf file (vocab and template from its metadata)."""
        from transformers import AutoTokenizer

        path = os.path.expanduser(path)
        if path.lower().endswith(".gguf"):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GGUF file {path} does not exist")
            hf = _load_gguf_tokenizer(path)
            template = _gguf_chat_template(path)
        else:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"tokenizer path {path} is neither a directory nor a .gguf file")
            try:
                hf = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
            template = hf.chat_template
        if isinstance(template, dict):  # older multi-template format: {name: template}
            template = template.get("default") or next(iter(template.values()), None)
        return cls(hf, template or None)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self.hf.bos_token

    @property
    def eos_token(self) -> str | None:
        return self.hf.eos_token

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation to the prompt text (special tokens as text; encode it without adding more).
        Extra keyword arguments (e.g. `tools`) become template variables."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a completion prompt instead")
        msgs = normalize_messages(messages)
        template = _compile_template(self.chat_template)
        variables = {
            "bos_token": self.hf.bos_token or "",
            "eos_token": self.hf.eos_token or "",
            "unk_token": self.hf.unk_token or "",
            "pad_token": self.hf.pad_token or "",
            **kwargs,
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
        }
        return template.render(**variables)


def _gguf_chat_template(path: str) -> str | None:
    # reuse the loader's cached reader: parsing a GGUF's metadata takes a second or two
    from .loader import gguf_field, open_gguf

    return gguf_field(open_gguf(path), "tokenizer.chat_template")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages; list-of-parts content becomes a string (text parts joined by newlines)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has invalid role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = msg.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**msg, "content": content})
    return out


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # like transformers: no HTML escaping (jinja's default tojson escapes <, >, &, ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except Exception as e:
        raise ValueError(f"invalid chat template: {e}") from e


class IncrementalDetokenizer:
    """Turns generated token ids into text one token at a time, with stop strings.

    Each `add` decodes only a small window: ids[prefix_offset:read_offset] (text already emitted, as
    context) and ids[prefix_offset:] (with the new token); the difference is the new text. Text ending in
    U+FFFD (an incomplete UTF-8 character split across tokens) is held back until the next token.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop_strings: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = [s for s in stop_strings if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        # only the prompt's tail is kept, as decoding context
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self.output_text = ""
        self.stop_reason: str | None = None  # the stop string that ended the output
        self.finished = False
        self._sent = 0

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids."""
        return self._ids[self._num_context :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, force: bool = False) -> str:
        """Decode the window; return the new complete text (everything pending if `force`)."""
        ids = self._ids
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        pending = len(ids) - self._read_offset
        if new_text.endswith(_REPLACEMENT) and not force and pending < _MAX_PENDING_TOKENS:
            return ""  # incomplete character: wait for more bytes
        if not new_text.startswith(prefix_text):  # unusual decoders: fall back to the length difference
            logger.debug("window decode is not prefix-stable: %r vs %r", prefix_text, new_text)
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return new_text[len(prefix_text) :]

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the matched stop string when the output must stop (the
        text is then truncated at it), else None. `check_stop=False` appends without matching stops."""
        if self.finished:
            logger.debug("token %d added after the output finished; ignored", token_id)
            return None
        self._ids.append(int(token_id))
        return self._append_text(self._advance(), check_stop)

    def flush(self, check_stop: bool = True) -> str | None:
        """Emit any text still held back (e.g. an incomplete character at the end of the output)."""
        if self.finished or self._read_offset == len(self._ids):
            return None
        return self._append_text(self._advance(force=True), check_stop)

    def _append_text(self, delta: str, check_stop: bool) -> str | None:
        if not delta:
            return None
        self.output_text += delta
        if not check_stop or not self.stop_strings:
            return None
        text = self.output_text
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            # a new match must end inside the new text
            idx = text.find(stop, max(0, len(text) - len(delta) - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.output_text = text[: idx + len(stop)] if self.include_stop_str_in_output else text[:idx]
        self.stop_reason = stop
        self.finished = True
        return stop

    @property
    def stream_text(self) -> str:
        """`output_text` minus a trailing partial match of a stop string (safe to send while streaming)."""
        text = self.output_text
        if self.finished or not self.stop_strings:
            return text
        hold = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return text[: len(text) - hold] if hold else text

    def next_stream_chunk(self, final: bool = False) -> str:
        """The streamable text not returned by earlier calls; `final` releases held-back text too."""
        text = self.output_text if final or self.finished else self.stream_text
        chunk = text[self._sent :]
        self._sent = max(self._sent, len(text))
        return chunk
