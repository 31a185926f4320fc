"""Speculative decoding inside continuous batching: proposers, adaptive k, and the verifier.

Each step, before scheduling, `SpecDecoder.plan` picks k for every decoding sequence (0: it decodes as usual). The
scheduler gives such a sequence 1 + k slots and the model runner runs them as 1 + k decode rows over its block
table (each row attends to its own prefix, exactly as plain decoding computes that position). Proposals come
from an n-gram lookup in the sequence's own tokens (before scheduling: it needs no KV cache) or from a draft model
(after scheduling, so the slots it writes exist and shared blocks are already copied). The target model then runs
the sequence's last token and its k proposed tokens in the same forward pass as everything else, with logits for
all 1 + k positions, and `verify` keeps the accepted prefix plus one token of the target's own:

- greedy: the proposed tokens that equal the target's argmax, then the target's argmax after them;
- sampling: Leviathan et al. / Chen et al. rejection sampling. Proposed token x is accepted with probability
  min(1, p(x) / q(x)) (q: the draft's distribution; a point mass for n-gram proposals); the first rejected one is
  replaced by a sample of normalise(max(p - q, 0)); when all are accepted, a bonus token is drawn from p. p is the
  distribution the sampler itself would draw from (temperature, top-k, top-p, min-p), so the output distribution
  is exactly the target's.

The engine then appends the tokens one by one through its ordinary stop checks and rolls the KV cache back to the
tokens kept (num_computed_tokens, and the blocks allocated only for rejected tokens are freed). A draft model's own
cache is indexed by the target's block tables (same block ids), so it needs no allocator of its own: it is rolled
back by lowering the sequence's `draft_computed`, and block copies of the target are applied to it too. The
self-speculative draft runs the target's first K layers on the target's own cache: those layers compute exactly
what the target writes there for every kept token, and the slots of rejected ones are rewritten before any read.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig, SpeculativeConfig
from ..model.layers.attention import PrefillSpan
from .model_runner import batch_metadata, ensure_rope_positions
from .sampler import Sampler, SamplingRow, _argmax
from .sequence import Sequence

logger = logging.getLogger(__name__)

# Adaptive k: acceptance-rate EMA weight of the newest verification, and the draft-model back-off.
EMA_WEIGHT = 0.3
PAUSE_BELOW = 0.1  # a draft model stops proposing for a sequence whose acceptance EMA falls below this ...
PAUSE_STEPS = 8  # ... for this many steps, then probes again with k = 1; each failed probe doubles the pause ...
MAX_PAUSE_STEPS = 256  # ... up to this

RowFn = Callable[[Sequence, int], SamplingRow]  # (sequence, offset from its next output token) -> sampling row


def eligible(seq: Sequence) -> bool:
    """Requests whose sampling reads the token history (penalties) are left to plain decoding, and so are those
    whose client opted out."""
    p = seq.group.params
    return p.speculative and not p.needs_penalties


# ---- proposers ---------------------------------------------------------------------------------------------------
class NgramProposer:
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens (n from ngram_max
    down to ngram_min) in its prompt and output, and propose the tokens that followed it."""

    before_schedule = True

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
            # Windows of the history without its last token, so the suffix itself never matches.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + k].tolist()
        return []


class DraftModelProposer:
    """A draft model proposing k tokens autoregressively (k forward passes of the draft, decodes batched across
    sequences). `caches()` gives the draft's KV caches, indexed by the target's block tables. With
    `shares_target_cache` (the self-speculative draft) the caches are the target's first K layers, which always
    hold what the draft would compute for every computed token; otherwise the draft first catches up on the tokens
    it has not seen (`Sequence.draft_computed`)."""

    before_schedule = False

    def __init__(
        self, model: torch.nn.Module, caches: Callable[[], list], shares_target_cache: bool, block_size: int,
        device: torch.device, sampler: Sampler,
    ) -> None:
        self.model = model
        self.caches = caches
        self.shares_target_cache = shares_target_cache
        self.block_size = block_size
        self.device = device
        self.sampler = sampler

    def propose(self, seqs: list[Sequence], row_fn: RowFn) -> None:
        """Fills `spec_tokens` (and `spec_probs` for sampled requests) with `num_lookahead` tokens per sequence."""
        drafts: dict[int, list[int]] = {s.seq_id: [] for s in seqs}
        probs: dict[int, list[torch.Tensor]] = {s.seq_id: [] for s in seqs}
        chunks = []
        for seq in seqs:
            c = seq.num_computed_tokens
            start = c if self.shares_target_cache else min(seq.draft_computed, c)
            chunks.append((seq.token_ids[start : c + 1], start, seq.block_table))
        active = list(seqs)
        for j in range(max(s.num_lookahead for s in seqs)):
            logits = self._forward(chunks)
            tokens, dists = self._sample(logits, active, j, row_fn)
            nxt, chunks = [], []
            for seq, tok, dist in zip(active, tokens, dists):
                drafts[seq.seq_id].append(tok)
                if dist is not None:
                    probs[seq.seq_id].append(dist)
                if j + 1 < seq.num_lookahead:
                    nxt.append(seq)
                    chunks.append(([tok], seq.num_computed_tokens + j + 1, seq.block_table))
            active = nxt
            if not active:
                break
        for seq in seqs:
            seq.spec_tokens = drafts[seq.seq_id]
            seq.spec_probs = torch.stack(probs[seq.seq_id]) if probs[seq.seq_id] else None
            # The draft cache now holds positions up to c + k - 1; verification lowers this to what is kept.
            seq.draft_computed = seq.num_computed_tokens + seq.num_lookahead

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], j: int, row_fn: RowFn
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        rows = [row_fn(s, j) for s in seqs]
        work = self.sampler.processed_logits(logits, rows)
        tokens = _argmax(work).tolist()
        dists: list[torch.Tensor | None] = [None] * len(seqs)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, dtype=torch.long, device=logits.device)
            p = self.sampler.normalised_probs(work[idx], [rows[i].params for i in sampled])
            for r, i in enumerate(sampled):
                gen = rows[i].generator or self.sampler.default_generator(p.device)
                tokens[i] = int(torch.multinomial(p[r], 1, generator=gen))
                dists[i] = p[r]
        return tokens, dists

    @torch.inference_mode()
    def _forward(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """Runs (tokens, first position, block table) chunks through the draft; logits of each chunk's last token."""
        bs, dev = self.block_size, self.device
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][0]) > 1)  # decodes first
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last = [0] * len(chunks)
        dec_tables, dec_lens, prefills = [], [], []
        for i in order:
            tokens, first, table = chunks[i]
            n, start = len(tokens), len(ids)
            pos = np.arange(first, first + n)
            ids.extend(tokens)
            positions.extend(pos.tolist())
            slots.extend((np.asarray(table)[pos // bs] * bs + pos % bs).tolist())
            if n == 1:
                dec_tables.append(table)
                dec_lens.append(first + 1)
            else:
                prefills.append(PrefillSpan(start, n, first + n, torch.tensor(table, dtype=torch.long, device=dev)))
            last[i] = start + n - 1
        ensure_rope_positions(self.model, max(positions) + 1)
        meta = batch_metadata(slots, dec_tables, dec_lens, prefills, bs, dev)
        return self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.caches(),
            meta,
            torch.tensor(last, dtype=torch.long, device=dev),
        )


# ---- verification ------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    tokens: list[int]  # the accepted proposed tokens, then one token of the target's
    num_accepted: int


def rejection_sample(
    p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, gen: torch.Generator
) -> Verdict:
    """p: [k + 1, V] target distributions; q: [k, V] draft distributions, None for a point mass on each draft."""
    k = len(drafts)
    for j, x in enumerate(drafts):
        px = float(p[j, x])
        qx = 1.0 if q is None else float(q[j, x])
        u = float(torch.rand(1, generator=gen, device=gen.device))
        if u * qx < px:  # accept with probability min(1, p(x) / q(x))
            continue
        if q is None:
            residual = p[j].clone()
            residual[x] = 0.0
        else:
            residual = (p[j] - q[j].to(p.dtype)).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: any sample of p is right
            residual = p[j]
        token = int(torch.multinomial(residual.to(gen.device), 1, generator=gen))
        return Verdict(drafts[:j] + [token], j)
    token = int(torch.multinomial(p[k].to(gen.device), 1, generator=gen))
    return Verdict(list(drafts) + [token], k)


def greedy_verify(target: list[int], drafts: list[int]) -> Verdict:
    """target: the target's argmax at each of the k + 1 rows."""
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return Verdict(list(drafts[:a]) + [target[a]], a)


# ---- the engine's side ---------------------------------------------------------------------------------------------
class SpecDecoder:
    """Plans k per sequence, runs the proposer, verifies, and counts (the engine applies the verdicts)."""

    def __init__(self, config: SpeculativeConfig, sampler: Sampler, proposer, max_model_len: int,
                 max_rows: int | None = None) -> None:
        self.config = config
        self.max_rows = max_rows  # decode rows per step, proposals included (None: no cap)
        self.sampler = sampler
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.reset_stats()

    def reset_stats(self) -> None:
        self.num_drafts = 0  # verifications
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * self.config.num_speculative_tokens

    # ---- before scheduling ----------------------------------------------------------------------------------
    def plan(self, running: list[Sequence]) -> None:
        """Sets num_lookahead (and, for the n-gram proposer, spec_tokens) of every running sequence."""
        off = len(running) > self.config.disable_by_batch_size
        for seq in running:
            seq.num_lookahead = 0
        candidates = [] if off else [s for s in running if s.num_tokens - s.num_computed_tokens == 1 and eligible(s)]
        # The rows left under max_rows are shared equally: speculation never makes the step a bigger matmul.
        share = None if self.max_rows is None else (self.max_rows - len(running)) // max(1, len(candidates))
        for seq in candidates:
            k = self._k_for(seq)
            if share is not None:
                k = min(k, share)
            if k <= 0:
                continue
            if self.proposer.before_schedule:
                seq.spec_tokens = self.proposer.propose(seq.token_ids, k)
                k = len(seq.spec_tokens)
                seq.spec_probs = None
            seq.num_lookahead = k

    def _k_for(self, seq: Sequence) -> int:
        if seq.spec_pause > 0:
            seq.spec_pause -= 1
            return 0
        k_max = self.config.num_speculative_tokens
        k = max(1, min(k_max, int(np.ceil(k_max * seq.spec_acceptance))))
        # Tokens past max_tokens or the context would be thrown away.
        p = seq.group.params
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - seq.num_output_tokens - 1)
        return min(k, self.max_model_len - seq.num_tokens)

    # ---- after scheduling -----------------------------------------------------------------------------------
    def propose(self, scheduled: list[tuple[Sequence, int]], row_fn: RowFn) -> None:
        if self.proposer.before_schedule:
            return
        seqs = [s for s, _ in scheduled if s.num_lookahead]
        if seqs:
            self.proposer.propose(seqs, row_fn)

    def verify(self, logits: torch.Tensor, items: list[tuple[Sequence, int]], row_fn: RowFn) -> list[Verdict]:
        """items: (sequence, first of its 1 + k logits rows)."""
        idx: list[int] = []
        rows: list[SamplingRow] = []
        for seq, first in items:
            k = seq.num_lookahead
            idx.extend(range(first, first + k + 1))
            rows.extend(row_fn(seq, j) for j in range(k + 1))
        sub = logits[torch.tensor(idx, dtype=torch.long, device=logits.device)]
        work = self.sampler.processed_logits(sub, rows)
        target = _argmax(work).tolist()
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        probs = None
        pos_of: dict[int, int] = {}
        if sampled:
            s_idx = torch.tensor(sampled, dtype=torch.long, device=logits.device)
            probs = self.sampler.normalised_probs(work[s_idx], [rows[i].params for i in sampled])
            pos_of = {r: i for i, r in enumerate(sampled)}
        verdicts = []
        base = 0
        for seq, _ in items:
            k = seq.num_lookahead
            drafts = seq.spec_tokens[:k]
            row = rows[base]
            if row.params.greedy:
                v = greedy_verify(target[base : base + k + 1], drafts)
            else:
                p = probs[pos_of[base] : pos_of[base] + k + 1]
                q = None if seq.spec_probs is None else seq.spec_probs[:k]
                gen = row.generator or self.sampler.default_generator(p.device)
                v = rejection_sample(p, drafts, q, gen)
            self._record(seq, k, v.num_accepted)
            verdicts.append(v)
            base += k + 1
        return verdicts

    def _record(self, seq: Sequence, k: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += k
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1
        seq.group.spec_draft_tokens += k
        seq.group.spec_accepted_tokens += accepted
        seq.spec_acceptance = (1 - EMA_WEIGHT) * seq.spec_acceptance + EMA_WEIGHT * accepted / k
        if self.proposer.before_schedule:
            return
        if seq.spec_acceptance < PAUSE_BELOW:
            seq.spec_backoff = min(MAX_PAUSE_STEPS, 2 * seq.spec_backoff) if seq.spec_backoff else PAUSE_STEPS
            seq.spec_pause = seq.spec_backoff
            seq.spec_acceptance = PAUSE_BELOW  # the probe after the pause proposes one token
        elif accepted:
            seq.spec_backoff = 0

    def stats(self) -> dict[str, float]:
        drafts, tokens, acc = self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        return {
            "spec_decode_num_drafts": drafts,
            "spec_decode_num_draft_tokens": tokens,
            "spec_decode_num_accepted_tokens": acc,
            "spec_decode_acceptance_rate": acc / tokens if tokens else 0.0,
            # tokens each verification produces (accepted ones plus the target's own), as vLLM reports it
            "spec_decode_mean_accepted_length": 1 + acc / drafts if drafts else 0.0,
        }


# ---- construction --------------------------------------------------------------------------------------------------
def self_draft_layers(config: SpeculativeConfig, target_cfg: ModelConfig) -> int:
    k = config.draft_layers or max(1, target_cfg.num_layers // 4)
    if k >= target_cfg.num_layers:
        raise ValueError(
            f"speculative_draft_layers must be smaller than the model's {target_cfg.num_layers} layers, got {k}"
        )
    return k


def check_draft_compatible(draft_path: str, draft_cfg: ModelConfig, target_cfg: ModelConfig, target_tokenizer) -> None:
    """A draft model must share the target's tokenizer: same vocabulary size and the same token strings."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"speculative model {draft_path} has a vocabulary of {draft_cfg.vocab_size} tokens but the target has "
            f"{target_cfg.vocab_size}: a draft model must share the target's tokenizer"
        )
    from ..model.tokenizer import Tokenizer

    try:
        draft_tok = Tokenizer.from_path(draft_path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"speculative model {draft_path}: cannot load its tokenizer to compare with the target's: {e}") from e
    if draft_tok.hf.get_vocab() != target_tokenizer.hf.get_vocab():
        raise ValueError(
            f"speculative model {draft_path} has a different tokenizer from the target's (same size, different "
            "tokens): a draft model must share the target's tokenizer"
        )
