"""Batched token sampler with per-row sampling parameters.

Order of operations (matches vLLM): blocked tokens -> penalties -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> exponential-race sampling. Reported logprobs come
from the raw model distribution (log_softmax of the unprocessed logits).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.model.layers.cpu_kernels import cpu_ops
from tokenmill.sampling_params import SamplingParams

__all__ = ["SamplingRow", "SampleResult", "Sampler", "apply_penalties", "compute_logprobs"]

# Smallest noise value; guards against a 0 draw turning probs / noise into inf or nan.
_MIN_NOISE = 1e-20


@dataclass
class SamplingRow:
    """One row of the logits matrix and everything needed to sample it."""

    params: SamplingParams
    generator: torch.Generator | None  # per-sequence generator when params.seed is set, else None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    blocked_token_ids: Sequence[int] = ()  # forbidden this step (e.g. EOS while under min_tokens)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # sampled token's raw logprob, when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # top-N (token_id, logprob), sorted desc


def _flat_indices(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) index tensors for every token of every list; ids outside the vocab are dropped."""
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(token_lists):
        rows.extend([i] * len(ids))
        cols.extend(ids)
    r = torch.tensor(rows, dtype=torch.long, device=device)
    c = torch.tensor(cols, dtype=torch.long, device=device)
    valid = (c >= 0) & (c < vocab_size)
    if not bool(valid.all()):
        r, c = r[valid], c[valid]
    return r, c


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax (first maximum on ties, the first NaN if any). On CPU the compiled kernel (float32), else `max(dim)`,
    several times faster than `argmax` over a vocabulary."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] and x.stride(1) == 1:
        ops = cpu_ops()
        if ops is not None and hasattr(ops, "argmax_rows"):
            return ops.argmax_rows(x)
    return x.max(dim=-1).indices


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Apply repetition / frequency / presence penalties to ``logits`` [B, V] in place.

    Repetition: tokens seen in prompt or output have positive logits divided by the penalty and
    negative ones multiplied. Frequency: subtract penalty * count in output. Presence: subtract
    penalty if the token occurs in the output. Penalty tensors have shape [B]. Returns ``logits``.
    """
    batch, vocab = logits.shape
    device = logits.device
    r, c = _flat_indices(output_token_ids, vocab, device)
    counts = torch.zeros(batch, vocab, dtype=logits.dtype, device=device)
    counts.index_put_((r, c), torch.ones_like(r, dtype=logits.dtype), accumulate=True)
    output_mask = counts > 0

    rep = repetition_penalties.to(device=device, dtype=logits.dtype).unsqueeze(1)
    if bool((rep != 1.0).any()):
        pr, pc = _flat_indices(prompt_token_ids, vocab, device)
        seen = output_mask.clone()
        seen[pr, pc] = True
        scale = torch.where(seen, rep, torch.ones_like(rep))
        logits.copy_(torch.where(logits > 0, logits / scale, logits * scale))

    freq = frequency_penalties.to(device=device, dtype=logits.dtype).unsqueeze(1)
    pres = presence_penalties.to(device=device, dtype=logits.dtype).unsqueeze(1)
    logits -= freq * counts
    logits -= pres * output_mask.to(logits.dtype)
    return logits


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """log_softmax of raw logits rows; the logprob of token_ids[i] in row i and the top_n of each row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = token_ids.to(device=logprobs.device, dtype=torch.long).view(-1, 1)
    chosen = logprobs.gather(1, ids).squeeze(1).tolist()
    rows = logprobs.shape[0]
    if top_n <= 0:
        return chosen, [[] for _ in range(rows)]
    top_vals, top_ids = logprobs.topk(min(top_n, logprobs.shape[1]), dim=-1)
    tops = [list(zip(i_row, v_row)) for i_row, v_row in zip(top_ids.tolist(), top_vals.tolist())]
    return chosen, tops


class Sampler:
    """Samples one token per row; owns the default generator used by unseeded rows."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def default_generator(self, device: torch.device) -> torch.Generator:
        """The generator unseeded rows draw from."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        token_ids = self.sample_ids(logits, rows)
        return self._results(logits, token_ids, [row.params for row in rows])

    def sample_ids(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The sampled token id of each row, left on the logits' device."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V], got {tuple(logits.shape)} for {len(rows)} rows")
        batch = logits.shape[0]
        device = logits.device
        if batch == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        params = [row.params for row in rows]
        any_blocked = any(len(row.blocked_token_ids) > 0 for row in rows)
        any_penalties = any(p.needs_penalties for p in params)
        sampled = [i for i, p in enumerate(params) if not p.greedy]

        if not any_blocked and not any_penalties and not sampled:
            # Fast path: an all-greedy batch with nothing to mask is one argmax.
            token_ids = _argmax(logits)
        else:
            work = self.processed_logits(logits, rows)
            if len(sampled) == batch:
                token_ids = self._sample(work, rows)
            else:
                token_ids = _argmax(work)  # greedy rows; sampled rows are overwritten below
                if sampled:
                    idx = torch.tensor(sampled, dtype=torch.long, device=device)
                    token_ids[idx] = self._sample(work[idx], [rows[i] for i in sampled])
        return token_ids

    @staticmethod
    def _penalize(work: torch.Tensor, rows: list[SamplingRow], pen_rows: list[int]) -> None:
        """Penalties on the rows that need them only (others are left untouched)."""
        device = work.device
        sub_params = [rows[i].params for i in pen_rows]
        idx = torch.tensor(pen_rows, dtype=torch.long, device=device)
        sub = work[idx]
        # Prompt tokens matter only for the repetition penalty; skip them otherwise.
        prompts = [rows[i].prompt_token_ids if p.repetition_penalty != 1.0 else () for i, p in zip(pen_rows, sub_params)]
        apply_penalties(
            sub,
            prompts,
            [rows[i].output_token_ids for i in pen_rows],
            torch.tensor([p.repetition_penalty for p in sub_params], dtype=torch.float32, device=device),
            torch.tensor([p.frequency_penalty for p in sub_params], dtype=torch.float32, device=device),
            torch.tensor([p.presence_penalty for p in sub_params], dtype=torch.float32, device=device),
        )
        work[idx] = sub

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then an exponential race; ``logits`` is owned (modified)."""
        n, vocab = logits.shape
        device = logits.device
        probs = self._processed_probs(logits, [row.params for row in rows])

        # Exponential race: argmax(p / E), E ~ Exp(1), picks i with probability p_i / sum(p).
        unseeded = [i for i, row in enumerate(rows) if row.generator is None]
        default_gen = self.default_generator(device) if unseeded else None
        if len(unseeded) == n:
            noise = torch.empty_like(probs).exponential_(generator=default_gen)
        else:
            noise = torch.empty_like(probs)
            if unseeded:
                u_idx = torch.tensor(unseeded, dtype=torch.long, device=device)
                noise[u_idx] = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=default_gen)
        for i, row in enumerate(rows):
            gen = row.generator
            if gen is None:
                continue
            if gen.device == noise.device:
                noise[i].exponential_(generator=gen)
            else:  # e.g. a CPU generator with GPU logits: draw where the generator lives
                noise[i] = torch.empty(vocab, device=gen.device).exponential_(generator=gen).to(device)
        noise.clamp_min_(_MIN_NOISE)
        return _argmax(probs / noise)

    def _processed_probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p, softmax, min-p (not renormalised after min-p); ``logits`` is modified."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        logits.div_(temperature.unsqueeze(1))

        # Top-p needs one descending sort over the rows that use it (or top-k); top-k alone
        # needs only a partial topk. Both keep every token tied with the k-th largest logit,
        # so a row's result does not depend on which path its batch takes.
        if any(p.top_p < 1.0 for p in params):
            trunc = [i for i, p in enumerate(params) if p.effective_top_k > 0 or p.top_p < 1.0]
            self._top_k_top_p(logits, params, trunc)
        elif any(p.effective_top_k > 0 for p in params):
            trunc = [i for i, p in enumerate(params) if p.effective_top_k > 0]
            self._top_k_only(logits, params, trunc)

        probs = torch.softmax(logits, dim=-1)

        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)  # renormalising is unnecessary for argmax
        return probs

    def normalised_probs(self, work: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """``work`` from processed_logits (owned, modified) -> the normalised sampling distribution per row."""
        probs = self._processed_probs(work, params)
        return probs / probs.sum(dim=-1, keepdim=True)

    def processed_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """A float32 copy of ``logits`` with blocked tokens at -inf and penalties applied (what greedy rows argmax)."""
        work = logits.to(dtype=torch.float32, copy=True)
        if any(len(row.blocked_token_ids) > 0 for row in rows):
            r, c = _flat_indices([row.blocked_token_ids for row in rows], work.shape[1], work.device)
            work[r, c] = float("-inf")
        pen_rows = [i for i, row in enumerate(rows) if row.params.needs_penalties]
        if pen_rows:
            self._penalize(work, rows, pen_rows)
        return work

    @staticmethod
    def _top_k_only(logits: torch.Tensor, params: list[SamplingParams], trunc: list[int]) -> None:
        vocab, device = logits.shape[1], logits.device
        top_k = torch.tensor([min(params[i].effective_top_k, vocab) for i in trunc], dtype=torch.long, device=device)
        t_idx = torch.tensor(trunc, dtype=torch.long, device=device)
        sub = logits[t_idx]
        top_vals = sub.topk(int(top_k.max()), dim=-1).values
        kth = top_vals.gather(1, (top_k - 1).unsqueeze(1))
        logits[t_idx] = sub.masked_fill_(sub < kth, float("-inf"))

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], trunc: list[int]) -> None:
        vocab, device = logits.shape[1], logits.device
        tp = [params[i] for i in trunc]
        top_k = torch.tensor([min(p.effective_top_k, vocab) or vocab for p in tp], dtype=torch.long, device=device)
        top_p = torch.tensor([p.top_p for p in tp], dtype=torch.float32, device=device).unsqueeze(1)
        t_idx = torch.tensor(trunc, dtype=torch.long, device=device)
        sub = logits[t_idx]
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
        # Keep a token if the mass strictly before it is < top_p: the smallest set reaching
        # top_p, always including the top token. top_p == 1 keeps everything (no rounding loss).
        probs_sorted = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        drop = (mass_before >= top_p) & (top_p < 1.0)
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
        logits[t_idx] = sub.scatter_(1, order, sorted_logits)

    @staticmethod
    def _results(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> list[SampleResult]:
        ids = token_ids.tolist()
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        results = [SampleResult(token_id=t, logprob=None, top_logprobs=None) for t in ids]
        if lp_rows:
            idx = torch.tensor(lp_rows, dtype=torch.long, device=logits.device)
            top_n = max(params[i].logprobs or 0 for i in lp_rows)
            chosen, tops = compute_logprobs(logits[idx], token_ids[idx], top_n)
            for j, i in enumerate(lp_rows):
                results[i].logprob = chosen[j]
                results[i].top_logprobs = tops[j][: params[i].logprobs]
        return results
