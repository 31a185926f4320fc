"""Continuous batching: a per-step token budget shared by decodes and (chunked) prefills, FCFS, preemption by
recomputation when KV blocks run out.

Every sequence is scheduled the same way: compute the tokens from `num_computed_tokens` up to its length (a whole
prompt, a chunk of it, or the one token sampled last step). Running sequences go first (decode-first fairness);
waiting ones are admitted in arrival order while budget, sequence slots and blocks last.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    # (sequence, number of tokens to compute this step); single-token entries first
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Keep a few blocks free when admitting new work so running sequences can grow without thrashing.
        self.watermark_blocks = max(0, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked child joins the running set right after its parent."""
        seq.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(seq.group.seqs[0]) + seq.index, seq)

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _speculative_slots(self, seq: Sequence, num_new: int, budget: int, spare: int) -> int:
        """1 + k tokens for a decoding sequence that verifies k proposed tokens (k cut to the budget); just its
        own token when fewer than the blocks it needs plus `spare` are free."""
        k = min(seq.num_lookahead, budget - 1) if num_new == 1 else 0
        if k > 0 and self.bm.append_slots(seq, 1 + k, reserve=self.watermark_blocks + spare):
            seq.num_lookahead = k
            return 1 + k
        seq.num_lookahead = 0
        return num_new

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        seq.num_lookahead = 0
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        logger.debug("preempted sequence %d (recompute)", seq.seq_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decodes: list[tuple[Sequence, int]] = []
        prefills: list[tuple[Sequence, int]] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.num_lookahead:
                # Keep a block for each running sequence after it: speculation must not push anyone out.
                num_new = self._speculative_slots(seq, num_new, budget, len(self.running) - i - 1)
            scheduled = True
            while not self.bm.append_slots(seq, num_new):
                victim = self.running.pop()  # the newest running sequence gives way
                self._preempt(victim, out)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            # A sequence verifying proposed tokens runs them as decode rows (see ModelRunner.execute).
            (decodes if num_new == 1 or seq.num_lookahead else prefills).append((seq, num_new))
            budget -= num_new
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                if not seq.block_table:
                    self.bm.match_prefix(seq)
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not self.bm.append_slots(seq, num_new, reserve=self.watermark_blocks if self.running else 0):
                    self.bm.free(seq)  # give back prefix-cache hits; retried next step
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                (decodes if num_new == 1 else prefills).append((seq, num_new))
                budget -= num_new

        out.scheduled = decodes + prefills
        out.block_copies = self.bm.take_copies()
        return out
