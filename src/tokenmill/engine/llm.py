"""Offline API: tokenmill.LLM(model=...).generate(...) / .chat(...)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..config import EngineConfig
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine
from .outputs import RequestOutput

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """Runs a model in-process. `model` is a Hugging Face directory or a GGUF file; None is the embedded
    SmolLM2-135M-Instruct. Other keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts: a string, a list of token ids, a list of either, or dicts with "prompt" / "prompt_token_ids".
        Returns one finished RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(prompts, dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts; give one or one per prompt"
                )
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        requests = []
        for prompt, params in zip(prompts, params_list):
            text, ids = _split_prompt(prompt)
            requests.append((f"offline-{next(self._ids)}", text, ids, params))
        added: list[str] = []
        try:
            for rid, text, ids, params in requests:
                self.engine.add_request(rid, text, params, prompt_token_ids=ids)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            self.engine.step()  # drain the aborted outputs
            raise
        return self._run(added, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            # The template already holds the BOS text where the model wants it.
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while len(finished) < len(request_ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
                if not self.engine.has_unfinished_requests() and len(finished) < len(request_ids):
                    raise RuntimeError("engine stopped with requests unfinished")
        except BaseException:
            for rid in wanted - finished.keys():
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt" not in prompt and "prompt_token_ids" not in prompt:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return prompt.get("prompt"), prompt.get("prompt_token_ids")
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict; got {type(prompt).__name__}")
