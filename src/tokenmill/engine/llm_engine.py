"""LLMEngine: add_request / abort_request / step. One step = schedule, run the model once, sample, detokenise,
check stop conditions, and report what changed."""
from __future__ import annotations

import itertools
import logging
import time

import torch

from ..config import EngineConfig, blocks_needed
from ..model.loader import load_model_config, load_weights_into, release_gguf_readers
from ..model.paths import resolve_model_path
from ..quant.apply import weight_bytes_by_part
from ..model.registry import model_class
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from ..model.layers.attention import configure_windows, layer_windows
from ..model.layers.hugepages import trim_heap
from ..model.layers.linear import Linear
from ..sampling_params import SamplingParams
from .async_step import PendingSample, can_defer
from .block_manager import BlockManager
from .cuda_graphs import MAX_GRAPH_ROWS
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampler import Sampler, SamplingRow, compute_logprobs
from .scheduler import Scheduler
from .sequence import Sequence, SequenceGroup, SequenceStatus
from .spec_decode import DraftModelProposer, NgramProposer, SpecDecoder, check_draft_compatible, self_draft_layers

logger = logging.getLogger(__name__)


def _logits_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if rows == list(range(logits.shape[0])):
        return logits  # the common case: one sampled row per logits row, in order
    return logits[torch.tensor(rows, device=logits.device)]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = resolve_model_path(config.model)
        self.model_config = cfg = load_model_config(self.model_path)
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(cfg, self.device)
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context of {cfg.max_position_embeddings}"
            )

        t0 = time.perf_counter()
        cls = model_class(cfg)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # parameters born in the model dtype: no float32 model first (RAM peak)
        try:
            with torch.device(self.device):
                model = cls(cfg, max_positions=self.max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        model = model.to(self.dtype)
        self.quant_layout = load_weights_into(model, self.model_path, config.quantization)
        self.weight_bytes = weight_bytes_by_part(model)
        self.tokenizer = Tokenizer.from_path(config.tokenizer or self.model_path)
        # the GGUF reader and the loading's temporaries go before the packed and huge-page copies come (RAM peak)
        release_gguf_readers()
        trim_heap()
        model.prepare_for_inference()
        self.model = model.eval()
        logger.info(
            "weights: %.1f MiB (%s)", self.weight_bytes["total"] / 2**20,
            ", ".join(f"{k} {v / 2**20:.1f}" for k, v in self.weight_bytes.items() if k != "total"),
        )
        logger.info("loaded %s (%s, %s) in %.1fs", self.model_path, cfg.architecture, self.dtype, time.perf_counter() - t0)

        # --kv-window: every layer sees the first kv_sinks tokens and the last kv_window (or its own narrower window)
        self.kv_window = config.kv_window
        windows = layer_windows(cfg.sliding_windows, config.kv_window)
        sinks = config.kv_sinks if config.kv_window is not None else 0
        configure_windows(model, windows, sinks)
        self.runner = ModelRunner(model, cfg, self.device, config.resolve_kv_dtype(self.dtype))
        self.draft_runner: ModelRunner | None = None  # speculative decoding with a separate draft model
        cache = config.cache
        num_blocks = self.runner.profile_num_blocks(cache, config.max_num_seqs * self.max_model_len)
        capacity = num_blocks * cache.block_size
        if self.max_model_len > capacity:
            if config.max_model_len:
                raise ValueError(
                    f"max_model_len {self.max_model_len} needs {blocks_needed(self.max_model_len, cache.block_size)} "
                    f"KV blocks but the cache budget holds only {num_blocks}; raise the budget or lower max_model_len"
                )
            logger.warning("max_model_len lowered from %d to the KV-cache capacity %d", self.max_model_len, capacity)
            self.max_model_len = capacity
        self.runner.allocate_kv_cache(num_blocks, cache.block_size)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_cuda_graphs(min(config.max_num_seqs, MAX_GRAPH_ROWS), self.max_model_len, self.dtype)
        # Blocks can leave a sequence's view only when no layer attends to the whole context.
        drop_window = max(windows) if windows and all(w is not None for w in windows) else None
        if self.kv_window is not None:
            self._check_window_fits(drop_window or self.kv_window, sinks, num_blocks)
        self.block_manager = BlockManager(
            num_blocks, cache.block_size, cache.enable_prefix_caching, window=drop_window, sinks=sinks,
            max_cached_blocks=self.runner.max_cached_blocks(cache),
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler(config.seed)
        self.spec = self._make_spec_decoder(num_blocks, drop_window) if config.speculative.method else None
        self.async_scheduling = config.resolve_async_scheduling(self.device)
        self._pending: PendingSample | None = None  # the latest step's tokens, still on the device
        self.num_async_steps = 0  # decode steps launched before the previous step's tokens were read back
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.groups: dict[str, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        self._finished_outside_step: list[RequestOutput] = []
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.last_step_num_tokens = 0  # tokens computed by the latest step (metrics)
        # again: a draft model (speculative decoding) may have been loaded since, and KV profiling freed its scratch
        release_gguf_readers()
        trim_heap()

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        n = len(prompt_token_ids)
        if n > self.max_model_len and self.kv_window is None:
            raise ValueError(
                f"prompt has {n} tokens, more than the model's context length of {self.max_model_len} tokens"
            )
        group = SequenceGroup(request_id, prompt, prompt_token_ids, params, arrival_time or time.monotonic())
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        group.seqs.append(self._new_sequence(group, 0, list(prompt_token_ids)))
        self.groups[request_id] = group
        self.scheduler.add(group.seqs[0])
        self.num_prompt_tokens += n

    def _check_window_fits(self, window: int, sinks: int, num_blocks: int) -> None:
        """A sequence past its window holds its sink blocks, its window and one step's new tokens at most."""
        bs, budget = self.config.cache.block_size, self.config.max_num_batched_tokens
        need = blocks_needed(sinks, bs) + blocks_needed(window + budget, bs) + 1
        if need > num_blocks:
            raise ValueError(
                f"kv_window {window} with {sinks} sinks and max_num_batched_tokens {budget} needs up to {need} KV "
                f"blocks per sequence but the cache holds only {num_blocks}; raise the budget or lower them"
            )

    def _new_sequence(self, group: SequenceGroup, index: int, token_ids: list[int]) -> Sequence:
        params = group.params
        gen = None
        if params.seed is not None:
            # Each parallel sample gets its own stream; sample 0 uses the seed itself.
            seed = params.seed if index == 0 else hash((params.seed, index))
            gen = torch.Generator(device=self.device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        seq = Sequence(next(self._seq_ids), group, index, token_ids, len(group.prompt_token_ids), gen)
        if params.logprobs is not None:
            seq.logprobs = []
        return seq

    def abort_request(self, request_id: str, reason: str = "abort") -> bool:
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        for seq in group.seqs:
            if not seq.is_finished:
                self._finish(seq, reason)
        group.finished_time = time.monotonic()
        self._finished_outside_step.append(self._make_output(group))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or bool(self._finished_outside_step)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._check_timeouts()
        outputs, self._finished_outside_step = self._finished_outside_step, []
        pending, self._pending = self._pending, None
        if pending is not None:
            # Async scheduling: launch the next decode step first, then take in the previous step's tokens.
            self.last_step_num_tokens = 0
            self._pending = self._run_ahead(pending)
            outputs.extend(self._resolve(pending))
            return outputs
        if self.spec is not None:
            self.spec.plan(self.scheduler.running)
        sched = self.scheduler.schedule()
        self.last_step_num_tokens = sched.num_tokens
        if not sched.scheduled:
            return outputs
        now = time.monotonic()
        touched: dict[str, SequenceGroup] = {}
        for seq, _ in sched.scheduled:
            g = seq.group
            if g.first_scheduled_time is None:
                g.first_scheduled_time = now
            touched[g.request_id] = g

        copies = sched.block_copies
        if self.spec is not None:
            # A draft model writes the scheduled slots before the target: copy shared blocks first.
            self._copy_blocks(copies)
            copies = []
            self.spec.propose(sched.scheduled, self._sampling_row)
        logits, layout = self.runner.execute(sched.scheduled, copies)
        for seq, n in sched.scheduled:
            if seq.num_lookahead:
                continue  # how many of its tokens stay computed is known after verification
            seq.num_computed_tokens += n
            self.block_manager.commit_computed(seq)

        if layout.prompt_rows:
            self._record_prompt_logprobs(logits, layout.prompt_rows, sched.scheduled)

        # Gather the rows to sample; a request with n > 1 forks after its prompt, all samples sharing the logits.
        row_seqs: list[Sequence] = []
        row_index: list[int] = []
        for seq, _ in sched.scheduled:
            row = layout.sample_rows.get(seq.seq_id)
            if row is None:
                continue
            group = seq.group
            targets = [seq]
            if not group.forked:
                for i in range(1, group.params.n):
                    child = self._new_sequence(group, i, list(seq.token_ids))
                    self.block_manager.fork(seq, child)
                    group.seqs.append(child)
                    self.scheduler.add_running(child)
                    targets.append(child)
            for s in targets:
                row_seqs.append(s)
                row_index.append(row)
        if row_seqs and self.async_scheduling and all(can_defer(s) for s in row_seqs):
            self._pending = self._sample_deferred(logits, row_seqs, row_index)
            for seq in row_seqs:  # their output comes when their token is read back
                touched.pop(seq.group.request_id, None)
        elif row_seqs:
            self._sample_and_append(logits, row_seqs, row_index)
        if layout.spec_rows:
            self._verify_and_append(logits, layout.spec_rows, sched.scheduled)
        outputs.extend(self._group_outputs(touched.values()))
        return outputs

    def _group_outputs(self, groups) -> list[RequestOutput]:
        outputs = []
        for group in groups:
            out = self._make_output(group)
            outputs.append(out)
            if out.finished:
                group.finished_time = group.finished_time or time.monotonic()
                out.metrics.finished_time = group.finished_time
                self.groups.pop(group.request_id, None)
        return outputs

    # ---- async scheduling (async_step.py) -------------------------------------------------------------------
    def _sample_deferred(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> PendingSample:
        ids = self.sampler.sample_ids(_logits_rows(logits, rows), [self._sampling_row(seq) for seq in seqs])
        return PendingSample(seqs, ids)

    def _run_ahead(self, pending: PendingSample) -> PendingSample | None:
        """Launches the next decode step of the running sequences, whose input tokens are `pending`'s (still on
        the device); None when the next step needs the host to know them (see async_step.py)."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < self.config.max_num_seqs:
            return None  # a normal step admits it
        batch = []
        for seq in sched.running:  # one pending token each: all of them are `pending`'s
            if seq.num_pending_tokens != 1 or not can_defer(seq):
                return None
            if not self._length_done(seq, ahead=1):  # stopping after its pending token anyway
                batch.append(seq)
        if not batch or len(batch) > self.config.max_num_batched_tokens:
            return None
        bm = self.block_manager
        for seq in batch:
            if not bm.append_slots(seq, 1):  # short of blocks: a normal step preempts (slots taken stay for it)
                return None
        scheduled = [(seq, 1) for seq in batch]
        self.last_step_num_tokens = len(batch)
        self.num_async_steps += 1
        logits, _ = self.runner.execute(scheduled, bm.take_copies(), pending.inputs_for(batch))
        for seq in batch:
            seq.num_computed_tokens += 1
            bm.commit_computed(seq)
        return self._sample_deferred(logits, batch, list(range(len(batch))))

    def _resolve(self, pending: PendingSample) -> list[RequestOutput]:
        """Takes in the tokens of a deferred sample: detokenise, check stop conditions, report."""
        token_ids = pending.wait()
        now = time.monotonic()
        touched: dict[str, SequenceGroup] = {}
        for seq, token in zip(pending.seqs, token_ids):
            if seq.is_finished:  # aborted or timed out meanwhile; its placeholders went with it
                continue
            group = seq.group
            touched[group.request_id] = group
            if group.first_token_time is None:
                group.first_token_time = now
            seq.token_ids[len(seq.token_ids) - seq.num_pending_tokens] = token
            seq.num_pending_tokens -= 1
            try:
                self._take_token(seq, token)
            except Exception as e:
                self._fail_group(group, e)
            if not seq.is_finished:
                self.block_manager.commit_computed(seq)
        return self._group_outputs(touched.values())

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        results = self.sampler(_logits_rows(logits, rows), [self._sampling_row(seq) for seq in seqs])
        now = time.monotonic()
        for seq, res in zip(seqs, results):
            group = seq.group
            if group.first_token_time is None:
                group.first_token_time = now
            try:
                self._append_token(seq, res.token_id)
                if seq.logprobs is not None:
                    self._append_logprob(seq, res.token_id, res.logprob, res.top_logprobs)
            except Exception as e:  # one request's failure must not take the batch down
                self._fail_group(group, e)

    def _sampling_row(self, seq: Sequence, offset: int = 0) -> SamplingRow:
        """How to sample the sequence's output token number num_output_tokens + offset (offset > 0: a speculative
        position; such sequences have no penalties, which would read tokens not yet known)."""
        p = seq.group.params
        blocked = ()
        if seq.num_output_tokens + seq.num_pending_tokens + offset < p.min_tokens:
            blocked = tuple(self.eos_token_ids) + tuple(p.stop_token_ids or ())
        # Only penalties read the token history: don't copy it every step for rows that have none.
        if p.needs_penalties:
            prompt_ids, output_ids = seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids
        else:
            prompt_ids = output_ids = ()
        return SamplingRow(p, seq.generator, prompt_ids, output_ids, blocked)

    def _append_logprob(self, seq: Sequence, token: int, logprob: float, top: list | None) -> None:
        entry = dict(top or [])
        entry[token] = logprob
        seq.logprobs.append(entry)
        seq.cumulative_logprob += logprob

    def _fail_group(self, group: SequenceGroup, e: Exception) -> None:
        logger.exception("request %s failed while processing its output", group.request_id)
        group.error = f"{type(e).__name__}: {e}"
        for s in group.seqs:
            if not s.is_finished:
                self._finish(s, "error")

    # ---- speculative decoding -------------------------------------------------------------------------------
    def _make_spec_decoder(self, num_blocks: int, drop_window: int | None) -> SpecDecoder:
        spec_cfg = self.config.speculative
        bs = self.config.cache.block_size
        if spec_cfg.method == "ngram":
            proposer = NgramProposer(spec_cfg.ngram_max, spec_cfg.ngram_min)
        elif spec_cfg.method == "self":
            k = self_draft_layers(spec_cfg, self.model_config)
            runner = self.runner
            # The target called with its first K caches runs its first K layers, then its norm and head.
            proposer = DraftModelProposer(self.model, lambda: runner.kv_caches[:k], True, bs, self.device, self.sampler)
            logger.info("speculative decoding: self-draft of %d/%d layers", k, self.model_config.num_layers)
        else:
            if drop_window is not None:
                raise ValueError("a separate draft model cannot be used with attention windows that free KV blocks "
                                 "(kv_window or a sliding-window model); use speculative_method 'ngram' or 'self'")
            self.draft_runner = self._load_draft(spec_cfg.model, num_blocks, bs)
            proposer = DraftModelProposer(
                self.draft_runner.model, lambda: self.draft_runner.kv_caches, False, bs, self.device, self.sampler
            )
        logger.info("speculative decoding: %s, k = %d", spec_cfg.method, spec_cfg.num_speculative_tokens)
        # Where the linears take a few-row kernel, up to flat_cost_rows rows cost one plain decode step.
        flat = max((m.flat_cost_rows for m in self.model.modules() if isinstance(m, Linear)), default=0)
        rows = spec_cfg.max_verify_rows or (flat or None)
        return SpecDecoder(spec_cfg, self.sampler, proposer, self.max_model_len, max_rows=rows)

    def _load_draft(self, model: str, num_blocks: int, block_size: int) -> ModelRunner:
        path = resolve_model_path(model)
        cfg = load_model_config(path)
        check_draft_compatible(path, cfg, self.model_config, self.tokenizer)
        with torch.device(self.device):
            draft = model_class(cfg)(cfg, max_positions=self.max_model_len)
        draft = draft.to(self.dtype)
        load_weights_into(draft, path, self.config.quantization)
        draft.prepare_for_inference()
        configure_windows(draft, [None] * cfg.num_layers, 0)  # the draft only proposes: full attention is fine
        runner = ModelRunner(draft.eval(), cfg, self.device, self.config.resolve_kv_dtype(self.dtype))
        # Same block ids as the target's cache, so the target's block tables index it too.
        runner.allocate_kv_cache(num_blocks, block_size)
        logger.info("speculative decoding: draft model %s (%d layers)", path, cfg.num_layers)
        return runner

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.runner.copy_blocks(copies)
        if self.draft_runner is not None:
            self.draft_runner.copy_blocks(copies)

    def _verify_and_append(self, logits: torch.Tensor, spec_rows: dict[int, int], scheduled) -> None:
        items = [(seq, spec_rows[seq.seq_id]) for seq, _ in scheduled if seq.seq_id in spec_rows]
        verdicts = self.spec.verify(logits, items, self._sampling_row)
        now = time.monotonic()
        for (seq, first), verdict in zip(items, verdicts):
            group = seq.group
            if group.first_token_time is None:
                group.first_token_time = now
            computed = seq.num_computed_tokens + 1 + verdict.num_accepted  # its last token and the accepted ones
            seq.num_lookahead = 0
            seq.spec_tokens = []
            seq.spec_probs = None
            if seq.is_finished:  # a sibling's failure ended the whole request this step
                continue
            try:
                lps = None
                if seq.logprobs is not None:
                    rows = logits[first : first + len(verdict.tokens)]
                    lps = compute_logprobs(rows, torch.tensor(verdict.tokens), group.params.logprobs)
                for i, token in enumerate(verdict.tokens):
                    self._append_token(seq, token)
                    if lps is not None:
                        self._append_logprob(seq, token, lps[0][i], lps[1][i])
                    if seq.is_finished:
                        break
            except Exception as e:
                self._fail_group(group, e)
            if seq.is_finished:
                continue  # its blocks are free already
            seq.num_computed_tokens = computed
            seq.draft_computed = min(seq.draft_computed, computed)
            self.block_manager.trim_to_computed(seq)
            self.block_manager.commit_computed(seq)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        self._take_token(seq, token)

    def _take_token(self, seq: Sequence, token: int) -> None:
        """A generated token is in token_ids: detokenise it and check the stop conditions."""
        p = seq.group.params
        self.num_generated_tokens += 1
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                seq.token_ids[: seq.num_prompt_tokens],
                skip_special_tokens=p.skip_special_tokens,
                stop_strings=p.stop_strings,
                include_stop_str_in_output=p.include_stop_str_in_output,
            )
        can_stop = seq.num_output_tokens >= p.min_tokens
        stop_str = seq.detokenizer.add(token, check_stop=can_stop)
        if can_stop:
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, "stop")
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(seq, "stop", token)
            if stop_str is not None:
                return self._finish(seq, "stop", stop_str)
        if self._length_done(seq):
            self._finish(seq, "length")

    def _length_done(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether the sequence stops on length once `ahead` more tokens are known: max_tokens, or the context
        length (with a KV window the context bounds only the tokens generated when max_tokens is None: there is no
        context to run out of)."""
        max_tokens = seq.group.params.max_tokens
        outputs = seq.num_output_tokens + ahead
        if max_tokens is not None and outputs >= max_tokens:
            return True
        if self.kv_window is None:
            return seq.num_prompt_tokens + outputs >= self.max_model_len
        return max_tokens is None and outputs >= self.max_model_len

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.detokenizer is not None:
            seq.detokenizer.flush(check_stop=False)  # text held back for an incomplete character
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED

    def _record_prompt_logprobs(self, logits, prompt_rows, scheduled) -> None:
        by_id = {s.seq_id: s for s, _ in scheduled}
        for seq_id, (row, count, first_pos) in prompt_rows.items():
            seq = by_id[seq_id]
            group = seq.group
            targets = torch.tensor(seq.token_ids[first_pos + 1 : first_pos + 1 + count], device=logits.device)
            lps, tops = compute_logprobs(logits[row : row + count], targets, group.params.prompt_logprobs)
            for tok, lp, top in zip(targets.tolist(), lps, tops):
                entry = dict(top)
                entry[tok] = lp
                group.prompt_logprobs.append(entry)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        expired = [
            g.request_id for g in self.groups.values() if g.params.timeout is not None and now - g.arrival_time > g.params.timeout
        ]
        for rid in expired:
            self.abort_request(rid, reason="timeout")

    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        outs = []
        for seq in group.seqs:
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.detokenizer.output_text if seq.detokenizer else "",
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=seq.logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    stream_text=seq.detokenizer.stream_text if seq.detokenizer else "",
                )
            )
        finished = group.forked and group.is_finished or group.error is not None or any(
            s.finish_reason in ("abort", "timeout") for s in group.seqs
        )
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outs,
            finished=finished,
            metrics=RequestMetrics(
                group.arrival_time, group.first_scheduled_time, group.first_token_time, group.finished_time,
                group.spec_draft_tokens, group.spec_accepted_tokens,
            ),
            prompt_logprobs=group.prompt_logprobs,
            error=group.error,
        )

    # ---- introspection --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_cached_blocks": len(bm.evictable),
            "kv_cache_usage": bm.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
            **({"async_steps": self.num_async_steps} if self.async_scheduling else {}),
            **(self.spec.stats() if self.spec is not None else {}),
        }
