"""Owns the model and its KV cache; turns a scheduled batch into flat tensors and runs one forward pass."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import CacheConfig, ModelConfig, blocks_needed
from ..model.layers.attention import AttentionMetadata, PrefillSpan
from ..model.layers.cpu_kernels import cpu_ops
from ..model.layers.kv_cache import KVCache, QuantizedKVCache, new_kv_cache
from .cuda_graphs import DecodeGraphs, graphs_supported
from .sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class BatchLayout:
    """Where each scheduled sequence's rows are in the logits the forward pass returns."""

    sample_rows: dict[int, int]  # seq_id -> logits row of its next-token distribution
    prompt_rows: dict[int, tuple[int, int, int]]  # seq_id -> (first logits row, count, first position)
    # seq_id -> first of the 1 + k logits rows of a sequence verifying k speculative tokens
    spec_rows: dict[int, int] = field(default_factory=dict)


CPU_DEFAULT_KV_BYTES = 4 * 2**30
CPU_DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20  # SmolLM2 (23 KB per token in bf16): ~11,600 cached tokens


def ensure_rope_positions(model: torch.nn.Module, num_positions: int) -> None:
    """Makes the model's RoPE tables cover positions [0, num_positions) (a KV window lets sequences run past the
    context length the model was built for)."""
    rotary = getattr(model, "rotary", None)
    if rotary is not None and num_positions > rotary.max_positions:
        rotary.ensure_positions(num_positions)


def batch_metadata(
    slots: list[int], dec_tables: list[list[int]], dec_lens: list[int], prefills: list[PrefillSpan],
    block_size: int, device: torch.device,
) -> AttentionMetadata:
    """Attention metadata of a flat batch: its cache slots, the decode rows' block tables (padded with 0) and
    context lengths, and the prefill spans."""
    dec_bt = dec_ctx = None
    if dec_tables:
        width = max(len(t) for t in dec_tables)
        padded = np.zeros((len(dec_tables), width), dtype=np.int64)
        for r, t in enumerate(dec_tables):
            padded[r, : len(t)] = t
        dec_bt = torch.from_numpy(padded).to(device)
        dec_ctx = torch.tensor(dec_lens, dtype=torch.long, device=device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode=len(dec_tables),
        decode_block_tables=dec_bt,
        decode_context_lens=dec_ctx,
        prefills=prefills,
        block_size=block_size,
    )


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, model_cfg: ModelConfig, device: torch.device, kv_dtype: torch.dtype
    ) -> None:
        self.model = model
        self.cfg = model_cfg
        self.device = device
        self.kv_dtype = kv_dtype  # torch.int8: the quantised cache of kv_cache.py
        self.kv_caches: list[KVCache] = []
        self.block_size = 0
        self.pad_block: int | None = None  # CUDA: a scratch block past the allocator's, written by graph padding rows
        self.graphs: DecodeGraphs | None = None

    # ---- KV cache -------------------------------------------------------------------------------------------
    def block_bytes(self, block_size: int) -> int:
        return block_size * self.cfg.kv_bytes_per_token(self.kv_dtype)

    def profile_num_blocks(self, cache: CacheConfig, max_tokens_needed: int) -> int:
        """Number of KV blocks from the memory budget (explicit bytes, or a fraction of free memory)."""
        if cache.num_blocks is not None:
            return cache.num_blocks
        per_block = self.block_bytes(cache.block_size)
        if cache.kv_cache_bytes is not None:
            budget = cache.kv_cache_bytes
        elif self.device.type == "cuda":
            # Room for every sequence at full length is enough; more only feeds the prefix cache.
            budget = min(self._cuda_budget(cache), max_tokens_needed * self.cfg.kv_bytes_per_token(self.kv_dtype))
        else:
            budget = int(available_memory_bytes() * cache.memory_fraction)
            # More than the configured batch can ever hold only feeds the prefix cache; past a few GiB the
            # start-up cost of zeroing the cache outweighs what a CPU can use.
            budget = min(budget, max_tokens_needed * self.cfg.kv_bytes_per_token(self.kv_dtype), CPU_DEFAULT_KV_BYTES)
        num = budget // per_block
        if num < 1:
            raise ValueError(f"KV-cache budget of {budget} bytes is smaller than one block ({per_block} bytes)")
        return int(num)

    def max_cached_blocks(self, cache: CacheConfig) -> int | None:
        """The most blocks the prefix cache keeps that no running sequence uses (BlockManager.max_cached_blocks).
        On CPU the cache's pages become resident when first written (allocate_kv_cache), so without a bound resident
        memory would grow toward the whole KV budget as finished requests fill the cache."""
        limit = cache.prefix_cache_bytes
        if limit is None and self.device.type == "cpu":
            limit = CPU_DEFAULT_PREFIX_CACHE_BYTES
        return None if limit is None else limit // self.block_bytes(cache.block_size)

    def _cuda_budget(self, cache: CacheConfig) -> int:
        """Fraction of device memory minus what weights and a warm-up forward pass at full token budget use."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup_forward(self._profile_tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return max(0, int(total * cache.memory_fraction) - peak)

    _profile_tokens = 512

    def _new_caches(self, num_blocks: int, block_size: int, zeroed: bool) -> list[KVCache]:
        cfg = self.cfg
        return [
            new_kv_cache(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype, self.device, zeroed)
            for _ in range(cfg.num_layers)
        ]

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        # The PyTorch decode path multiplies masked-out (padding) slots by weight 0, so garbage there could turn into
        # NaN: zero the cache for it. The CPU kernels read only valid slots, so on CPU the cache stays unwritten and
        # the OS commits pages only as blocks are used (fast start, resident memory grows with actual use).
        zeroed = not (self.device.type == "cpu" and cpu_ops() is not None)
        cuda = self.device.type == "cuda"
        self.kv_caches = self._new_caches(num_blocks + int(cuda), block_size, zeroed)
        self.pad_block = num_blocks if cuda else None
        self.block_size = block_size
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB, %s)",
            num_blocks,
            block_size,
            num_blocks * self.block_bytes(block_size) / 2**20,
            self.kv_dtype,
        )

    def capture_cuda_graphs(self, max_rows: int, max_model_len: int, dtype: torch.dtype) -> bool:
        """Captures the decode graphs (cuda_graphs.py) for up to `max_rows` rows of up to `max_model_len` tokens;
        returns whether decode steps will replay them."""
        why = graphs_supported(self.model, self.kv_caches, dtype) if self.pad_block is not None else "not on CUDA"
        if why is not None:
            logger.info("CUDA graphs off: %s", why)
            return False
        ensure_rope_positions(self.model, max_model_len)
        graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, self.pad_block, max_rows,
                              blocks_needed(max_model_len, self.block_size), self.device)
        try:
            graphs.capture()
        except RuntimeError as e:  # an op that cannot be captured: stay eager rather than fail to start
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", e)
            return False
        self.graphs = graphs
        return True

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            if isinstance(cache, QuantizedKVCache):
                cache.copy_blocks_(src, dst)
            else:
                cache[:, dst] = cache[:, src]

    def _warmup_forward(self, num_tokens: int) -> None:
        self.prompt_logits(torch.zeros(num_tokens, dtype=torch.long), last_only=True)

    def prompt_logits(self, token_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits of one prompt run alone with a throwaway KV cache (activation profiling, reference checks)."""
        n = token_ids.shape[0]
        block_size = 16
        nb = -(-n // block_size)
        caches = self._new_caches(nb, block_size, zeroed=False)
        ensure_rope_positions(self.model, n)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            num_decode=0,
            decode_block_tables=None,
            decode_context_lens=None,
            prefills=[PrefillSpan(0, n, n, torch.arange(nb, device=self.device))],
            block_size=block_size,
        )
        rows = torch.arange(n - 1 if last_only else 0, n, device=self.device)
        with torch.inference_mode():
            return self.model(token_ids.to(self.device), torch.arange(n, device=self.device), caches, meta, rows)

    # ---- one step -------------------------------------------------------------------------------------------
    def execute(
        self, scheduled: list[tuple[Sequence, int]], block_copies: list[tuple[int, int]],
        input_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, BatchLayout]:
        """Runs the scheduled chunks. Decodes (one token, or a speculating sequence's 1 + k) must come first in
        `scheduled`. `input_tokens`: a decode-only step's input tokens as a device tensor, one per row, when the host
        does not have them yet (async scheduling; the sequences hold placeholders)."""
        self.copy_blocks(block_copies)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        sample_rows: dict[int, int] = {}
        prompt_rows: dict[int, tuple[int, int, int]] = {}
        spec_rows: dict[int, int] = {}
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        num_positions = 0

        for seq, n in scheduled:
            start = len(input_ids)
            c = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                input_ids.append(seq.token_ids[c])
                positions.append(c)
                slots.append(table[c // bs] * bs + c % bs)
                dec_tables.append(table)
                dec_lens.append(c + 1)
            elif seq.num_lookahead:
                # Its last token, then the proposed ones, each a decode row of its own over the same block table
                # with one more token of context: the paged decode kernel does the causal masking, and every row
                # is computed exactly as plain decoding computes that position.
                input_ids.append(seq.token_ids[c])
                input_ids.extend(seq.spec_tokens[: n - 1])
                positions.extend(range(c, c + n))
                for p in range(c, c + n):
                    slots.append(table[p // bs] * bs + p % bs)
                    dec_tables.append(table)
                    dec_lens.append(p + 1)
            else:
                input_ids.extend(seq.token_ids[c : c + n])
                pos = np.arange(c, c + n)
                positions.extend(pos.tolist())
                slots.extend((np.asarray(table)[pos // bs] * bs + pos % bs).tolist())
                prefills.append(
                    PrefillSpan(start, n, c + n, torch.tensor(table, dtype=torch.long, device=self.device))
                )
            group = seq.group
            if group.prompt_logprobs is not None and c + 1 == len(group.prompt_logprobs) and c < seq.num_prompt_tokens - 1:
                # Logits at positions c..c+count-1 score prompt tokens c+1..c+count.
                count = min(n, seq.num_prompt_tokens - 1 - c)
                prompt_rows[seq.seq_id] = (len(logits_idx), count, c)
                logits_idx.extend(range(start, start + count))
            if c + n == seq.num_tokens:
                sample_rows[seq.seq_id] = len(logits_idx)
                logits_idx.append(start + n - 1)
            elif seq.num_lookahead:
                spec_rows[seq.seq_id] = len(logits_idx)
                logits_idx.extend(range(start, start + n))
            num_positions = max(num_positions, c + n)

        layout = BatchLayout(sample_rows, prompt_rows, spec_rows)
        if not logits_idx:
            logits_idx.append(len(input_ids) - 1)  # the model always returns at least one row

        ensure_rope_positions(self.model, num_positions)
        graphs = self.graphs
        if (graphs is not None and not prefills and len(logits_idx) == len(input_ids)
                and graphs.can_run(len(input_ids), max(len(t) for t in dec_tables))):
            return graphs.run(input_ids, positions, slots, dec_tables, dec_lens, input_tokens), layout
        dev = self.device
        meta = batch_metadata(slots, dec_tables, dec_lens, prefills, bs, dev)
        if input_tokens is None:
            input_tokens = torch.tensor(input_ids, dtype=torch.long, device=dev)
        with torch.inference_mode():
            logits = self.model(
                input_tokens,
                torch.tensor(positions, dtype=torch.long, device=dev),
                self.kv_caches,
                meta,
                torch.tensor(logits_idx, dtype=torch.long, device=dev),
            )
        return logits, layout
