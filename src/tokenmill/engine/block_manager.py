"""Paged KV blocks: allocation with reference counts, copy-on-write forks, and a prefix cache over full blocks.

Prefix cache: each full block is keyed by (key of the previous block, its token ids). The dict compares the token
tuple exactly, so a hash collision can never hand out the wrong block. Cached blocks whose reference count drops to
zero stay cached in an LRU and are evicted when a free block is needed, or when there are more of them than
`max_cached_blocks` (then the evicted block is the next one handed out: the set of blocks ever written, i.e. the
cache's resident memory on CPU, stays within the peak in use plus that bound).

Attention window: when every layer attends only to the first `sinks` tokens and the last `window` ones (a model's
native sliding window, or --kv-window), blocks no later token can see are released while the sequence runs; their
block-table entries become FREED_BLOCK, which attention never reads.
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence

FREED_BLOCK = -1  # block-table entry of a block released because it left the attention window


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int | None = None,
        sinks: int = 0, max_cached_blocks: int | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_cached_blocks = max_cached_blocks  # None: cached blocks nobody uses stay until a block is needed
        self.window = window  # None: some layer attends to the whole context, nothing is ever dropped
        self.sinks = sinks
        self.ref_counts = [0] * num_blocks
        # A stack (lowest ids on top, freed blocks pushed back on top): the blocks in use stay a compact, recently
        # touched set, so on CPU (cache left unwritten) resident memory follows the peak in-flight tokens.
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self.cached: dict[tuple, int] = {}  # prefix key -> block id
        self.block_key: dict[int, tuple] = {}  # block id -> its prefix key (cached blocks only)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU order
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for copy-on-write
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ---- accounting ------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _take_block(self) -> int:
        if not self.free_blocks:
            self._evict_lru()
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        return block

    def _evict_lru(self) -> None:
        """Moves the least recently used unreferenced cached block to the top of the free stack."""
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.block_key.pop(block)]
        self.free_blocks.append(block)

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_key:
                self.evictable[block] = None
                if self.max_cached_blocks is not None and len(self.evictable) > self.max_cached_blocks:
                    self._evict_lru()
            else:
                self.free_blocks.append(block)

    # ---- sequence operations ---------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attaches cached blocks for the longest cached prefix of a sequence that has no blocks yet.
        Returns the number of tokens found. At least one token is always left to compute (for its logits).

        With an attention window a prefix needs only the blocks its next token can see (the sinks' and the
        window's): the ones before the window may have been evicted (they leave a running sequence first, so the
        LRU evicts them first); they become FREED_BLOCK entries, as drop_out_of_window would have made them."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        # Prompt logprobs need the logits of every prompt position, so such requests compute them all.
        if not self.enable_prefix_caching or seq.group.params.prompt_logprobs is not None:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self.prefix_queries += seq.num_tokens
        keys: list[tuple] = []
        found: list[int | None] = []
        key: tuple | None = None
        for i in range(max_blocks):
            key = (hash(key), tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            block = self.cached.get(key)
            if block is None and self.window is None:
                break
            keys.append(key)
            found.append(block)
        n, dropped_until = self._longest_hit(found)
        for i in range(n):
            block = found[i]
            if i < dropped_until and i >= self._sink_blocks:
                seq.block_table.append(FREED_BLOCK)
                continue
            assert block is not None
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.block_keys = keys[:n]
        seq.dropped_until = dropped_until
        hit = n * bs
        self.prefix_hits += hit
        seq.num_computed_tokens = hit
        return hit

    @property
    def _sink_blocks(self) -> int:
        return -(-self.sinks // self.block_size)

    def _first_visible_block(self, num_tokens: int) -> int:
        """The first block after the sinks that the token at position `num_tokens` still sees."""
        return max(self._sink_blocks, (num_tokens - self.window + 1) // self.block_size)

    def _longest_hit(self, found: list[int | None]) -> tuple[int, int]:
        """(blocks of the longest usable prefix, the sequence's dropped_until) for the cached blocks `found` of a
        prompt's leading blocks (None: not cached)."""
        if self.window is None:
            return len(found), 0
        sink_blocks = min(self._sink_blocks, len(found))
        if any(found[i] is None for i in range(sink_blocks)):
            return 0, 0
        run = 0  # cached blocks ending at block n - 1
        runs = []
        for block in found:
            run = run + 1 if block is not None else 0
            runs.append(run)
        for n in range(len(found), 0, -1):
            lo = min(n, self._first_visible_block(n * self.block_size))
            if runs[n - 1] >= n - lo:
                return n, lo if lo > self._sink_blocks else 0
        return 0, 0

    def drop_out_of_window(self, seq: Sequence) -> int:
        """Releases the blocks of `seq` that no token from num_computed_tokens on can attend to (after the sinks and
        entirely before the window of the next token). Returns how many were released.

        A dropped block goes through the ordinary release, so prefix caching stays on: a block registered in the
        prefix cache keeps its contents and stays there as evictable (K/V of a position depend only on the tokens up
        to it under the attention rule every sequence of this engine shares, so a later hit is still correct), and
        it leaves the cache when it is reused. The sequence itself never holds or reads it again."""
        if self.window is None:
            return 0
        end = min(self._first_visible_block(seq.num_computed_tokens), len(seq.block_table))
        start = max(seq.dropped_until, self._sink_blocks)  # first block without a sink token
        dropped = 0
        for i in range(start, end):
            block = seq.block_table[i]
            if block != FREED_BLOCK:
                self._release(block)
                seq.block_table[i] = FREED_BLOCK
                dropped += 1
        seq.dropped_until = max(seq.dropped_until, end)
        return dropped

    def blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(seq.block_table)
        return max(need, 0) + (1 if self._needs_cow(seq, num_new_tokens) else 0)

    def _needs_cow(self, seq: Sequence, num_new_tokens: int) -> bool:
        first = seq.num_computed_tokens // self.block_size  # block the first new token is written to
        return num_new_tokens > 0 and first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1

    def append_slots(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        """Makes room for `num_new_tokens` more tokens after the computed ones. All or nothing: returns False and
        changes nothing when fewer than the needed blocks (+ `reserve`) are free (blocks that left the attention
        window are released first in any case)."""
        self.drop_out_of_window(seq)
        if self.blocks_to_append(seq, num_new_tokens) + reserve > self.num_free_blocks:
            return False
        if self._needs_cow(seq, num_new_tokens):
            idx = seq.num_computed_tokens // self.block_size
            old = seq.block_table[idx]
            new = self._take_block()
            self.pending_copies.append((old, new))
            self._release(old)
            seq.block_table[idx] = new
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._take_block())
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Registers the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending_tokens) // bs  # known tokens only
        key = seq.block_keys[-1] if seq.block_keys else None
        for i in range(len(seq.block_keys), full):
            key = (hash(key), tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            seq.block_keys.append(key)
            block = seq.block_table[i]
            if block != FREED_BLOCK and key not in self.cached and block not in self.block_key:
                self.cached[key] = block
                self.block_key[block] = key

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all of the parent's blocks; the first write to a shared block copies it."""
        child.block_table = list(parent.block_table)
        child.block_keys = list(parent.block_keys)
        child.num_computed_tokens = parent.num_computed_tokens
        child.dropped_until = parent.dropped_until
        child.draft_computed = parent.draft_computed
        for block in child.block_table:
            if block != FREED_BLOCK:
                self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        # Release in reverse so that, among evictable blocks, a sequence's tail goes before its shared head.
        for block in reversed(seq.block_table):
            if block != FREED_BLOCK:
                self._release(block)
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0
        seq.dropped_until = 0
        seq.draft_computed = 0

    def trim_to_computed(self, seq: Sequence) -> None:
        """Releases the blocks past the sequence's computed tokens (slots of rejected speculative tokens)."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            if block != FREED_BLOCK:
                self._release(block)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        while self.evictable:
            self._evict_lru()
