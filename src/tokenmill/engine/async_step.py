"""Async scheduling: launch decode step N+1 before step N's sampled tokens reach the host.

Synchronously, every step ends with the host waiting for the device (to read the sampled tokens), and the next step
starts with the device waiting for the host (schedule, build inputs, launch). On a GPU that host time is idle device
time: about 0.14 ms of a 1.25 ms decode step of a 1B model on an H200.

With async scheduling a step samples on the device and keeps the token ids there (a PendingSample); each sampled
sequence gets a placeholder token. The next engine step launches the following decode step with those device-side
ids as its input tokens, and only then reads the previous step's tokens back (by then they are ready) to detokenise
them and check stop conditions. A sequence that stopped has computed one token too many: it is dropped, its blocks
are freed, and anything that reuses them is ordered after that step on the device's stream.

Only plain decoding runs ahead: no speculative decoding, no penalties or logprobs (they read tokens or logits the
host does not have yet), no waiting requests to admit (those take a normal step, as does running short of KV
blocks). A sequence that will stop on length anyway (max_tokens, context) is left out of the step that runs ahead.
"""
from __future__ import annotations

import torch

from .sequence import Sequence

PLACEHOLDER_TOKEN = -1  # token_ids entry of a token sampled on the device and not yet read back


class PendingSample:
    """Token ids sampled on the device for `seqs` (row i for seqs[i]), on their way to the host."""

    def __init__(self, seqs: list[Sequence], token_ids: torch.Tensor) -> None:
        self.seqs = seqs
        self.token_ids = token_ids
        self._ready: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            # Copied as soon as they exist: reading them must not wait for the step launched after this one.
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = token_ids
        for seq in seqs:
            seq.token_ids.append(PLACEHOLDER_TOKEN)
            seq.num_pending_tokens += 1

    def inputs_for(self, seqs: list[Sequence]) -> torch.Tensor:
        """Device tensor of the sampled tokens of `seqs` (each one of this sample's), in that order."""
        if len(seqs) == len(self.seqs) and all(a is b for a, b in zip(seqs, self.seqs)):
            return self.token_ids
        rows = {seq.seq_id: i for i, seq in enumerate(self.seqs)}
        idx = torch.tensor([rows[seq.seq_id] for seq in seqs], dtype=torch.long)
        return self.token_ids[idx.to(self.token_ids.device)]

    def wait(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


def can_defer(seq: Sequence) -> bool:
    """Whether the sequence's sampled token may stay on the device for a step."""
    p = seq.group.params
    return not p.needs_penalties and p.logprobs is None and not seq.num_lookahead
