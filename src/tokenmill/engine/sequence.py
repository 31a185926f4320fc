"""Per-request state: a SequenceGroup (one request) holds one Sequence per parallel sample (n)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from ..model.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    group: "SequenceGroup"
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)  # prefix-cache keys of this sequence's full blocks
    dropped_until: int = 0  # block-table index below which blocks outside the attention window were freed
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: "IncrementalDetokenizer | None" = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    # speculative decoding: tokens proposed this step (num_lookahead of them are verified), the draft's
    # distribution over them (None: point mass), tokens in the draft model's KV cache, recent acceptance rate
    num_lookahead: int = 0
    spec_tokens: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    draft_computed: int = 0
    spec_acceptance: float = 1.0
    spec_pause: int = 0  # steps left without speculation after a run of rejections
    spec_backoff: int = 0  # length of the last pause (doubles while the probes after pauses keep failing)
    # async scheduling: trailing entries of token_ids that are placeholders for tokens sampled on the device and
    # not yet read back (engine/async_step.py)
    num_pending_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens known on the host (not the pending placeholders)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending_tokens]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def arrival_time(self) -> float:
        return self.group.arrival_time


@dataclass
class SequenceGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    spec_draft_tokens: int = 0  # proposed tokens verified by the target
    spec_accepted_tokens: int = 0

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def forked(self) -> bool:
        return len(self.seqs) == self.params.n
