"""Tests for the batched sampler (tokenmill.engine.sampler)."""
from __future__ import annotations

import math

import pytest
import torch

from tokenmill.engine.sampler import (
    SampleResult,
    Sampler,
    SamplingRow,
    apply_penalties,
    compute_logprobs,
)
from tokenmill.sampling_params import SamplingParams


def make_row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    blocked: list[int] | tuple[int, ...] = (),
) -> SamplingRow:
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, gen, prompt or [], output or [], blocked)


def chi2_sf(stat: float, dof: int) -> float:
    """Chi-square survival function: Q(dof/2, stat/2) (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- greedy

def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(6)]
    out = Sampler(seed=0)(logits, rows)
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()
    assert all(isinstance(r.token_id, int) and r.logprob is None and r.top_logprobs is None for r in out)


def test_greedy_rows_in_mixed_batch_and_input_untouched() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    before = logits.clone()
    rows = [
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(temperature=1.0, top_k=5)),
        make_row(SamplingParams(temperature=0.0, repetition_penalty=1.0)),
        make_row(SamplingParams(temperature=0.8, top_p=0.5, min_p=0.1)),
    ]
    out = Sampler(seed=0)(logits, rows)
    assert out[0].token_id == int(logits[0].argmax())
    assert out[2].token_id == int(logits[2].argmax())
    assert torch.equal(logits, before)


def test_bfloat16_logits_accepted() -> None:
    logits = torch.randn(3, 20).to(torch.bfloat16)
    rows = [make_row(SamplingParams(temperature=t)) for t in (0.0, 1.0, 0.5)]
    out = Sampler(seed=0)(logits, rows)
    assert out[0].token_id == int(logits[0].float().argmax())
    assert all(0 <= r.token_id < 20 for r in out)


# ---------------------------------------------------------------- seeds

def _run_seeded(positions: int, filler: int, steps: int, seed_logits: list[torch.Tensor]) -> list[int]:
    """Put one seeded row at position `positions` among `filler` unseeded rows; return its tokens."""
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    target_row = make_row(target)
    sampler = Sampler(seed=None)
    tokens = []
    for step in range(steps):
        rows, mats = [], []
        for j in range(filler + 1):
            if j == positions:
                rows.append(target_row)
                mats.append(seed_logits[step])
            else:
                rows.append(make_row(SamplingParams(temperature=1.0 + 0.1 * j, top_p=0.7 if j % 2 else 1.0)))
                mats.append(torch.randn(seed_logits[step].shape[0]))
        res = sampler(torch.stack(mats), rows)
        tokens.append(res[positions].token_id)
        target_row.output_token_ids = list(target_row.output_token_ids) + [res[positions].token_id]
    return tokens


def test_seeded_row_independent_of_batch() -> None:
    g = torch.Generator().manual_seed(7)
    steps, vocab = 8, 200
    seed_logits = [torch.randn(vocab, generator=g) for _ in range(steps)]
    ref = _run_seeded(0, 0, steps, seed_logits)
    for pos, filler in [(0, 3), (2, 5), (5, 5), (1, 1)]:
        assert _run_seeded(pos, filler, steps, seed_logits) == ref
    # A different seed gives a different sequence (vanishingly unlikely to collide over 8 steps).
    other_row = make_row(SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=99))
    sampler = Sampler()
    other = [sampler(seed_logits[s].unsqueeze(0), [other_row])[0].token_id for s in range(steps)]
    assert other != ref


def test_two_identical_seeded_rows_same_batch() -> None:
    logits = torch.randn(1, 100).repeat(2, 1)
    params = SamplingParams(temperature=1.0, seed=5)
    out = Sampler()(logits, [make_row(params), make_row(params)])
    assert out[0].token_id == out[1].token_id


def test_sampler_seed_reproducible_for_unseeded_rows() -> None:
    logits = torch.randn(16, 100)
    rows = [make_row(SamplingParams(temperature=1.0)) for _ in range(16)]
    a = [r.token_id for r in Sampler(seed=3)(logits, rows)]
    b = [r.token_id for r in Sampler(seed=3)(logits, rows)]
    assert a == b


# ---------------------------------------------------------------- truncation

def _draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    rows = [make_row(params) for _ in range(n)]
    return torch.tensor([r.token_id for r in Sampler(seed=seed)(logits, rows)])


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_allowed_set(k: int) -> None:
    logits_row = torch.randn(64, generator=torch.Generator().manual_seed(k))
    allowed = set(logits_row.topk(k).indices.tolist())
    drawn = _draw_many(logits_row, SamplingParams(temperature=1.5, top_k=k), 3000)
    assert set(drawn.tolist()) <= allowed
    if k > 1:
        assert len(set(drawn.tolist())) > 1


def _top_p_allowed(logits_row: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    probs = torch.softmax(logits_row.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    allowed, mass = set(), 0.0
    for tok in order:
        allowed.add(tok)
        mass += float(probs[tok])
        if mass >= top_p:
            break
    return allowed


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8])
def test_top_p_allowed_set(top_p: float) -> None:
    logits_row = torch.randn(40, generator=torch.Generator().manual_seed(11)) * 2
    allowed = _top_p_allowed(logits_row, 0.8, top_p)
    drawn = set(_draw_many(logits_row, SamplingParams(temperature=0.8, top_p=top_p), 3000).tolist())
    assert drawn <= allowed
    # Each allowed token keeps positive mass: with this many draws most should show up.
    assert len(drawn) >= max(1, len(allowed) - 2)


def test_top_k_then_top_p() -> None:
    logits_row = torch.randn(50, generator=torch.Generator().manual_seed(3))
    k, top_p = 8, 0.6
    top = logits_row.topk(k)
    restricted = torch.full_like(logits_row, float("-inf"))
    restricted[top.indices] = top.values
    allowed = _top_p_allowed(restricted, 1.0, top_p)
    drawn = set(_draw_many(logits_row, SamplingParams(temperature=1.0, top_k=k, top_p=top_p), 3000).tolist())
    assert drawn <= allowed


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_allowed_set(min_p: float) -> None:
    logits_row = torch.randn(40, generator=torch.Generator().manual_seed(5)) * 2
    probs = torch.softmax(logits_row / 0.7, -1)
    allowed = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    drawn = set(_draw_many(logits_row, SamplingParams(temperature=0.7, min_p=min_p), 3000).tolist())
    assert drawn <= allowed


def test_mixed_truncation_batch_each_row_respects_own_params() -> None:
    g = torch.Generator().manual_seed(21)
    vocab, reps = 32, 400
    logits_a = torch.randn(vocab, generator=g) * 2
    logits_b = torch.randn(vocab, generator=g) * 2
    logits_c = torch.randn(vocab, generator=g) * 2
    pa = SamplingParams(temperature=1.0, top_k=2)
    pb = SamplingParams(temperature=1.0, top_p=0.4)
    pc = SamplingParams(temperature=1.0)  # untruncated, shares the sort pass with the others
    logits = torch.stack([logits_a, logits_b, logits_c] * reps)
    rows = [make_row(p) for p in (pa, pb, pc)] * reps
    out = [r.token_id for r in Sampler(seed=1)(logits, rows)]
    assert set(out[0::3]) <= set(logits_a.topk(2).indices.tolist())
    assert set(out[1::3]) <= _top_p_allowed(logits_b, 1.0, 0.4)
    assert len(set(out[2::3])) > 5


def test_top_k_path_independent_of_top_p_rows() -> None:
    # A top-k-only seeded row takes the partial-topk path alone and the sort path next to a
    # top-p row; both must give the same tokens, ties at the k-th logit included.
    logits_row = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, top_k=3, seed=42)
    alone_row, mixed_row = make_row(params), make_row(params)
    sampler = Sampler(seed=0)
    alone, mixed = [], []
    for _ in range(50):
        alone.append(sampler(logits_row.unsqueeze(0), [alone_row])[0].token_id)
        batch = torch.stack([torch.randn(8), logits_row])
        other = make_row(SamplingParams(temperature=1.0, top_p=0.5))
        mixed.append(sampler(batch, [other, mixed_row])[1].token_id)
    assert alone == mixed
    assert set(alone) <= {0, 2, 3, 4, 6} and len(set(alone)) > 2  # ties with the 3rd logit kept


# ---------------------------------------------------------------- distribution

def _sample_counts(logits_row: torch.Tensor, temperature: float, n: int, seed: int) -> torch.Tensor:
    drawn = _draw_many(logits_row, SamplingParams(temperature=temperature), n, seed=seed)
    return torch.bincount(drawn, minlength=logits_row.shape[0])


def test_chi_square_temperature_sampling() -> None:
    logits_row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5, 0.2])
    temperature = 0.7
    counts = _sample_counts(logits_row, temperature, 20000, seed=2024)
    expected = torch.softmax(logits_row.double() / temperature, -1)
    stat = chi2_stat(counts, expected)
    p_value = chi2_sf(stat, dof=len(logits_row) - 1)
    assert p_value > 1e-3, (stat, p_value, counts.tolist())


def test_chi_square_detects_wrong_distribution() -> None:
    logits_row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5, 0.2])
    counts = _sample_counts(logits_row, 0.7, 20000, seed=2024)
    # Same logits without the temperature: a subtly wrong distribution must be rejected.
    wrong = torch.softmax(logits_row.double(), -1)
    stat = chi2_stat(counts, wrong)
    assert chi2_sf(stat, dof=7) < 1e-10
    assert stat > 500


def test_chi2_sf_matches_known_values() -> None:
    # Known quantiles: chi2(1) 95% = 3.841, chi2(7) 99.9% = 24.322.
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-5
    assert abs(chi2_sf(24.32189, 7) - 0.001) < 1e-6


# ---------------------------------------------------------------- penalties

def test_apply_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt = [[0, 1]]
    output = [[2, 2, 4]]
    out = apply_penalties(
        logits.clone(), prompt, output,
        torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]),
    )
    expected = torch.tensor([[
        2.0 / 2,                      # prompt token, positive: divided
        -1.0 * 2,                     # prompt token, negative: multiplied
        0.5 / 2 - 0.5 * 2 - 0.25,     # output twice: repetition, frequency x2, presence
        3.0,                          # unseen
        -2.0 * 2 - 0.5 * 1 - 0.25,    # output once, negative
    ]])
    assert torch.allclose(out, expected)


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    sampler = Sampler()
    # Repetition penalty via the prompt: 5/2 = 2.5 < 4.
    out = sampler(logits, [make_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])])
    assert out[0].token_id == 1
    # Frequency: 5 - 0.6 * 2 = 3.8 < 4.
    out = sampler(logits, [make_row(SamplingParams(temperature=0.0, frequency_penalty=0.6), output=[0, 0])])
    assert out[0].token_id == 1
    # Frequency with a single occurrence is not enough: 5 - 0.6 = 4.4 > 4.
    out = sampler(logits, [make_row(SamplingParams(temperature=0.0, frequency_penalty=0.6), output=[0])])
    assert out[0].token_id == 0
    # Presence counts once: 5 - 1.5 = 3.5 < 4 regardless of repeats.
    out = sampler(logits, [make_row(SamplingParams(temperature=0.0, presence_penalty=1.5), output=[0])])
    assert out[0].token_id == 1
    # Presence ignores prompt tokens.
    out = sampler(logits, [make_row(SamplingParams(temperature=0.0, presence_penalty=1.5), prompt=[0])])
    assert out[0].token_id == 0
    # A negative presence penalty rewards repeats: 4 + 2 = 6 > 5.
    out = sampler(logits, [make_row(SamplingParams(temperature=0.0, presence_penalty=-2.0), output=[1])])
    assert out[0].token_id == 1


def test_penalties_only_affect_their_rows() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]] * 3)
    rows = [
        make_row(SamplingParams(temperature=0.0), prompt=[0], output=[0, 0]),
        make_row(SamplingParams(temperature=0.0, frequency_penalty=1.0), output=[0, 0]),
        make_row(SamplingParams(temperature=0.0), prompt=[0], output=[0]),
    ]
    assert [r.token_id for r in Sampler()(logits, rows)] == [0, 1, 0]


# ---------------------------------------------------------------- blocked tokens and logprobs

def test_blocked_tokens_never_sampled() -> None:
    logits = torch.zeros(1, 6)
    logits[0, 2] = 10.0  # dominant token, blocked
    blocked = [2, 4]
    rows = [make_row(SamplingParams(temperature=1.0), blocked=blocked) for _ in range(2000)]
    out = Sampler(seed=0)(logits.repeat(2000, 1), rows)
    drawn = {r.token_id for r in out}
    assert drawn.isdisjoint(blocked)
    assert drawn == {0, 1, 3, 5}
    greedy = Sampler()(logits, [make_row(SamplingParams(temperature=0.0), blocked=blocked)])
    assert greedy[0].token_id not in blocked


def test_logprobs_from_raw_distribution() -> None:
    torch.manual_seed(4)
    logits = torch.randn(5, 40)
    params = [
        SamplingParams(temperature=0.5, logprobs=3, top_k=5),
        SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, logprobs=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.0, logprobs=1),
    ]
    rows = [make_row(p, prompt=[1, 2, 3], output=[4]) for p in params]
    out = Sampler(seed=0)(logits, rows)
    raw = torch.log_softmax(logits, -1)
    for i, (p, r) in enumerate(zip(params, out)):
        assert isinstance(r, SampleResult)
        if p.logprobs is None:
            assert r.logprob is None and r.top_logprobs is None
            continue
        assert isinstance(r.logprob, float)
        assert math.isclose(r.logprob, float(raw[i, r.token_id]), abs_tol=1e-5)
        assert r.top_logprobs is not None and len(r.top_logprobs) == p.logprobs
        values = [v for _, v in r.top_logprobs]
        assert values == sorted(values, reverse=True)
        ref = raw[i].topk(p.logprobs)
        assert [t for t, _ in r.top_logprobs] == ref.indices.tolist()
        for tok, val in r.top_logprobs:
            assert isinstance(tok, int) and math.isclose(val, float(raw[i, tok]), abs_tol=1e-5)


def test_compute_logprobs() -> None:
    torch.manual_seed(9)
    logits = torch.randn(3, 25) * 3
    token_ids = torch.tensor([0, 24, 7])
    chosen, tops = compute_logprobs(logits, token_ids, 4)
    ref = torch.log_softmax(logits.double(), -1)
    for i in range(3):
        assert math.isclose(chosen[i], float(ref[i, token_ids[i]]), abs_tol=1e-5)
        assert len(tops[i]) == 4
        ids = [t for t, _ in tops[i]]
        assert ids == ref[i].topk(4).indices.tolist()
        for tok, val in tops[i]:
            assert math.isclose(val, float(ref[i, tok]), abs_tol=1e-5)
    chosen0, tops0 = compute_logprobs(logits, token_ids, 0)
    assert tops0 == [[], [], []] and len(chosen0) == 3


def test_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.randn(2, 5), [make_row(SamplingParams())])


def test_seeded_row_uses_exponential_race_with_own_generator() -> None:
    # Contract: a seeded row draws V Exp(1) variates from its own generator per sampled step.
    logits_row = torch.randn(30, generator=torch.Generator().manual_seed(8))
    params = SamplingParams(temperature=0.7, seed=17)
    row = make_row(params)
    ref_gen = torch.Generator().manual_seed(17)
    sampler = Sampler(seed=0)
    for _ in range(5):
        got = sampler(logits_row.unsqueeze(0), [row])[0].token_id
        noise = torch.empty(30).exponential_(generator=ref_gen)
        expected = int((torch.softmax(logits_row / 0.7, -1) / noise).argmax())
        assert got == expected
