"""Block manager: reference counts, prefix-cache hits with exact token checks, LRU eviction, copy-on-write forks,
hits under an attention window."""
from __future__ import annotations

from tokenmill import SamplingParams
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceGroup

_ids = iter(range(10**6))


def make_seq(tokens: list[int]) -> Sequence:
    group = SequenceGroup(f"r{next(_ids)}", None, list(tokens), SamplingParams())
    seq = Sequence(next(_ids), group, 0, list(tokens), len(tokens))
    group.seqs.append(seq)
    return seq


def run_prefill(bm: BlockManager, seq: Sequence) -> int:
    hit = bm.match_prefix(seq)
    assert bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)
    return hit


def test_prefix_hit_requires_identical_tokens_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(12)))
    assert run_prefill(bm, a) == 0
    b = make_seq(list(range(12)))  # identical: at most 2 full blocks (the last token is always computed)
    assert run_prefill(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    c = make_seq(list(range(4)) + [99, 5, 6, 7, 8, 9])  # second block differs: only the first block is shared
    assert run_prefill(bm, c) == 4
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_lru_eviction_of_unreferenced_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3, 4, 5])  # 3 blocks, 2 full ones cached
    run_prefill(bm, old)
    bm.free(old)
    assert len(bm.evictable) == 2 and bm.num_free_blocks == 4
    new = make_seq([7, 8, 9, 10, 11, 12, 13])  # needs all 4 blocks: evicts both cached blocks
    assert run_prefill(bm, new) == 0
    assert not bm.evictable and bm.num_free_blocks == 0
    assert not bm.append_slots(make_seq([1, 2, 3]), 3)  # all or nothing when full
    bm.free(new)
    again = make_seq([1, 2, 3, 4, 5])
    assert bm.match_prefix(again) == 0  # the old prefix was evicted


def test_bounded_prefix_cache_keeps_recent_heads_and_reuses_evicted_blocks():
    bm = BlockManager(num_blocks=32, block_size=2, max_cached_blocks=3)
    a = make_seq(list(range(9)))  # 5 blocks, 4 full ones cached
    run_prefill(bm, a)
    used = list(a.block_table)
    head, tail = used[:3], used[3]
    bm.free(a)  # the tail is released first, so it is the least recently used
    assert list(bm.evictable) == head[::-1] and bm.num_free_blocks == 32
    probe = make_seq(list(range(9)))
    assert bm.match_prefix(probe) == 6  # the first three blocks are still a hit
    bm.free(probe)
    bm.reset_prefix_cache()
    assert not bm.evictable and not bm.cached and bm.num_free_blocks == 32
    # the evicted and freed blocks go back on top of the free stack: the next sequence reuses them
    b = make_seq([50 + i for i in range(8)])
    run_prefill(bm, b)
    assert tail in b.block_table and set(b.block_table) <= set(used)


def test_bounded_prefix_cache_bounds_the_blocks_ever_written():
    """With max_cached_blocks = M, the blocks ever handed out stay within the peak in use + M (on CPU: resident KV
    memory), however many distinct prompts pass through; without a bound they grow toward the whole cache."""
    import random

    rng = random.Random(0)

    def touched(bound):
        bm = BlockManager(num_blocks=400, block_size=4, max_cached_blocks=bound)
        written, running, peak = set(), [], 0
        for step in range(300):
            if running and (len(running) >= 6 or rng.random() < 0.4):
                bm.free(running.pop(rng.randrange(len(running))))
            else:
                prompt = [rng.randrange(1000) for _ in range(rng.randrange(5, 40))]
                if rng.random() < 0.3:  # a shared system prompt now and then
                    prompt = list(range(12)) + prompt
                seq = make_seq(prompt)
                run_prefill(bm, seq)
                written.update(seq.block_table)
                running.append(seq)
            peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        return len(written), peak, bm

    n, peak, bm = touched(8)
    assert len(bm.evictable) <= 8 and n <= peak + 8
    n_unbounded, _, _ = touched(None)
    assert n_unbounded > 2 * n


def test_prefix_cache_bound_zero_shares_only_between_running_sequences():
    bm = BlockManager(num_blocks=16, block_size=4, max_cached_blocks=0)
    a = make_seq(list(range(10)))
    run_prefill(bm, a)
    assert run_prefill(bm, make_seq(list(range(10)))) == 8  # a is still running
    bm.free(a)
    assert run_prefill(bm, make_seq(list(range(10)))) == 8  # the second one still holds the blocks


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6])  # one full block + a partial one
    run_prefill(bm, parent)
    child = make_seq([1, 2, 3, 4, 5, 6])
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.ref_counts[b] == 2 for b in parent.block_table)
    # Each appends its own 7th token: the shared partial block is copied once, for the first writer.
    parent.token_ids.append(10)
    assert bm.append_slots(parent, 1)
    copies = bm.take_copies()
    assert copies == [(child.block_table[1], parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0] and parent.block_table[1] != child.block_table[1]
    child.token_ids.append(11)
    assert bm.append_slots(child, 1)
    assert bm.take_copies() == []  # now the child owns its partial block alone
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_window_hit_needs_only_the_visible_blocks():
    """Window 4, blocks of 2, at most 2 cached blocks nobody uses: blocks 0-3 leave the window first, so the bound
    evicts them first and keeps 4 and 5, the only ones a 12-token prefix's next token sees. A hit attaches those
    behind FREED_BLOCK entries, as if the blocks before them had been dropped."""
    from tokenmill.engine.block_manager import FREED_BLOCK

    bm = BlockManager(num_blocks=32, block_size=2, window=4, max_cached_blocks=2)
    a = make_seq(list(range(12)))
    run_prefill(bm, a)
    assert bm.drop_out_of_window(a) == 4  # blocks 0-3 left the window
    kept = set(a.block_table[4:6])
    bm.free(a)
    assert set(bm.evictable) == kept
    b = make_seq(list(range(12)) + [50, 51, 52])
    assert bm.match_prefix(b) == 12
    assert b.block_table[:4] == [FREED_BLOCK] * 4 and set(b.block_table[4:]) == kept
    assert b.dropped_until == 4 and len(b.block_keys) == 6
    assert bm.append_slots(b, 3)
    b.num_computed_tokens = 15
    bm.commit_computed(b)  # the chain of keys goes on from the hit
    assert len(b.block_keys) == 7
    c = make_seq(list(range(12)) + [50, 51, 52, 53])  # finds the block b added (it needs blocks 5 and 6 now)
    assert bm.match_prefix(c) == 14 and c.block_table[:5] == [FREED_BLOCK] * 5
    assert c.block_table[5:] == b.block_table[5:7]
    bm.free(c)
    bm.free(b)
    # the blocks the next token sees are gone: no hit
    bm.reset_prefix_cache()
    assert bm.match_prefix(make_seq(list(range(12)) + [60])) == 0
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_window_hit_keeps_sink_blocks():
    """With 2 sink tokens (block 0) a hit also needs block 0: evicting it ends the hit, whatever else is cached."""
    bm = BlockManager(num_blocks=32, block_size=2, window=4, sinks=2, max_cached_blocks=3)
    a = make_seq(list(range(12)))
    run_prefill(bm, a)
    assert bm.drop_out_of_window(a) == 3  # blocks 1-3; block 0 holds the sinks
    sink, visible = a.block_table[0], set(a.block_table[4:6])
    bm.free(a)  # releases 5, 4, then the sink block: the bound evicts blocks 1-3, which left first
    assert set(bm.evictable) == visible | {sink}
    b = make_seq(list(range(12)) + [70])
    assert bm.match_prefix(b) == 12 and b.block_table[0] == sink and b.dropped_until == 4
    bm.free(b)
    bm.evictable.move_to_end(sink, last=False)  # make the sink block the least recently used, and evict it
    bm._evict_lru()
    assert set(bm.evictable) == visible
    assert bm.match_prefix(make_seq(list(range(12)) + [71])) == 0
