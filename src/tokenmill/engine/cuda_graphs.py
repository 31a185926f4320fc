"""CUDA graphs for decode steps.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python, the GPU waits on the
CPU. At start-up the model's forward pass for decode-only batches is captured once per batch size of
graph_batch_sizes() (up to the engine's row limit); a step then copies its inputs into the captured buffers and
replays the graph of the smallest size that holds it. Rows past the batch are padding: they write their key and
value to a scratch block that no sequence owns and attend to that token alone.

Capture needs every kernel of the step to take its sizes from the captured shapes, not from the batch's values:
decode attention must be the Triton kernel (attention.PagedAttention.uses_triton_decode). Anything else (prefill
chunks, more rows than captured, a RoPE table grown after capture) runs eagerly.
"""
from __future__ import annotations

import logging
import time

import torch

from ..model.layers.attention import AttentionMetadata, paged_attentions
from ..model.layers.kv_cache import KVCache

logger = logging.getLogger(__name__)

MAX_GRAPH_ROWS = 512  # larger decode batches run eagerly (their launch overhead is amortised anyway)


def graph_batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_rows (and max_rows itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8)) + [max_rows]
    return sorted(set(sizes))


def graphs_supported(model: torch.nn.Module, kv_caches: list[KVCache], dtype: torch.dtype) -> str | None:
    """None if every layer's decode attention can be captured; else why not."""
    attns = paged_attentions(model)
    if not attns:
        return "the model has no paged attention layers"
    for attn, cache in zip(attns, kv_caches):
        if not attn.uses_triton_decode(cache, dtype):
            return ("decode attention falls back to gathering (needs Triton, a KV cache in the model dtype, not "
                    "int8, and no attention sinks)")
    return None


class DecodeGraphs:
    """The captured decode graphs of one model and its KV cache, with their static input buffers."""

    def __init__(
        self, model: torch.nn.Module, kv_caches: list[KVCache], block_size: int, pad_block: int, max_rows: int,
        max_blocks: int, device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.pad_block = pad_block
        self.max_blocks = max_blocks
        self.sizes = graph_batch_sizes(max_rows)
        bmax = self.sizes[-1]
        pad_slot = pad_block * block_size
        # rows of `_host`/`_scalars`: token id, position, cache slot, context length
        self._host = torch.zeros((4, bmax), dtype=torch.long, pin_memory=True)
        self._host_bt = torch.full((bmax, max_blocks), pad_block, dtype=torch.long, pin_memory=True)
        self._host_np, self._host_bt_np = self._host.numpy(), self._host_bt.numpy()
        self._host_np[2], self._host_np[3] = pad_slot, 1
        self._scalars = self._host.to(device)
        self._tables = self._host_bt.to(device)
        self._rows = torch.arange(bmax, device=device)
        self._pad_slot = pad_slot
        self._copied = torch.cuda.Event()  # the latest step's copies out of the host buffers are done
        self._rope = model.rotary.cos
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                self._forward(b)  # warm-up: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(b)
                self._graphs[b] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batches of 1..%d rows in %.1fs", len(self.sizes),
                    self.sizes[-1], time.perf_counter() - t0)

    def _forward(self, b: int) -> torch.Tensor:
        s = self._scalars
        meta = AttentionMetadata(
            slot_mapping=s[2, :b], num_decode=b, decode_block_tables=self._tables[:b], decode_context_lens=s[3, :b],
            prefills=[], block_size=self.block_size,
        )
        return self.model(s[0, :b], s[1, :b], self.kv_caches, meta, self._rows[:b])

    def can_run(self, num_rows: int, max_table_len: int) -> bool:
        return (num_rows <= self.sizes[-1] and max_table_len <= self.max_blocks
                and self.model.rotary.cos is self._rope)  # a grown RoPE table has moved: the graphs read the old one

    def run(
        self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]], lens: list[int],
        input_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only batch of n rows (the logits row of each row is itself);
        `input_tokens`: the rows' tokens on the device, replacing `input_ids` (async scheduling)."""
        n = len(input_ids)
        b = next(size for size in self.sizes if size >= n)
        # With async scheduling the previous step may still be queued: its copies must have read these buffers.
        self._copied.synchronize()
        h, bt = self._host_np, self._host_bt_np
        h[0, :n], h[1, :n], h[2, :n], h[3, :n] = input_ids, positions, slots, lens
        h[0, n:b], h[1, n:b], h[2, n:b], h[3, n:b] = 0, 0, self._pad_slot, 1
        for r, t in enumerate(tables):
            bt[r, : len(t)] = t
        bt[n:b, 0] = self.pad_block
        graph, out = self._graphs[b]
        with torch.inference_mode():
            self._scalars.copy_(self._host, non_blocking=True)
            self._tables[:b].copy_(self._host_bt[:b], non_blocking=True)
            self._copied.record()
            if input_tokens is not None:
                self._scalars[0, :n].copy_(input_tokens)
            graph.replay()
            self.num_replays += 1
            return out[:n].clone()  # the graphs share one memory pool: the next replay may overwrite `out`
