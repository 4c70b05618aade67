"""The sampling noise: a pure function of (seed, step, row, column), strictly inside (0, 1)."""

import inspect

import pytest
import torch

from echox.errors import EchoXError
from echox.sampling import GREEDY, SamplingParams, gumbel_noise, head_select, select_reference, uniform_noise

MASK = (1 << 32) - 1


def inverse_fmix32(h: int) -> int:
    """The key whose murmur3 finaliser is h (each step of the finaliser is invertible mod 2^32)."""
    h ^= h >> 16
    h = (h * pow(0xC2B2AE35, -1, 1 << 32)) & MASK
    h ^= (h >> 13) ^ (h >> 26)
    h = (h * pow(0x85EBCA6B, -1, 1 << 32)) & MASK
    return h ^ (h >> 16)


def seed_drawing(h: int) -> int:
    """A seed whose draw at step 0, row 0, column 0 hashes to h (the key there is seed * 0x27D4EB2F)."""
    return (inverse_fmix32(h) * pow(0x27D4EB2F, -1, 1 << 32)) & MASK


def test_extreme_draws_stay_inside_the_unit_interval():
    step = torch.zeros((), dtype=torch.int64)
    largest, smallest = (uniform_noise(seed_drawing(h), step, 1, 1).item() for h in (MASK, 0))
    assert largest < 1.0 and smallest > 0.0
    assert torch.isfinite(gumbel_noise(seed_drawing(MASK), step, 1, 1)).all()  # +inf would pick any column


def test_noise_is_a_pure_function_of_its_counter():
    step = torch.tensor(7)
    first, again = uniform_noise(3, step, 2, 1000), uniform_noise(3, step, 2, 1000)
    assert torch.equal(first, again) and not torch.equal(first, uniform_noise(3, step + 1, 2, 1000))
    assert 0.45 < first.mean().item() < 0.55


def test_a_counter_per_row_hashes_each_row_as_a_batch_of_one():
    counters = torch.tensor([4, 0, 9])
    rows = uniform_noise(5, counters, 3, 50)
    for i, count in enumerate(counters):
        assert torch.equal(rows[i], uniform_noise(5, torch.tensor([count]), 1, 50)[0])
    with pytest.raises(EchoXError, match="1 or 3 entries"):
        uniform_noise(5, torch.tensor([1, 2]), 3, 50)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_head_is_converted_a_slice_at_a_time_with_the_same_logits(monkeypatch, dtype):
    from echox import sampling
    monkeypatch.setattr(sampling, "HEAD_ROWS", 8)  # 20 rows: slices of 8, 8 and 4
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 16, generator=gen), torch.randn(20, 16, generator=gen).to(dtype)
    whole = hidden @ weight.float().T
    converted, to_float = [], torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: converted.append((t.dtype, t.shape[0])) or to_float(t))
    logits = sampling.head_logits(hidden, weight)
    monkeypatch.undo()
    assert [rows for kind, rows in converted if kind == dtype] == [8, 8, 4]  # the head, 8 rows at a time
    torch.testing.assert_close(logits, whole, atol=1e-5, rtol=0)
    assert torch.equal(head_select(hidden, weight, GREEDY, torch.zeros(())), whole.argmax(-1))


def test_every_default_samples_as_the_released_model():
    """SPEC §6: temperature 0.2, top-p 0.9, wherever a user does not choose (API, chat, serve)."""
    from echox.cli import build_parser
    from echox.engine import Session
    from echox.sampling import RELEASED_SAMPLING

    assert (RELEASED_SAMPLING.temperature, RELEASED_SAMPLING.top_p, RELEASED_SAMPLING.top_k) == (0.2, 0.9, 0)
    assert inspect.signature(Session).parameters["sampling"].default == RELEASED_SAMPLING
    parser = build_parser()
    for argv in (["chat", "--model", "M", "--input", "q.wav", "--output", "a.wav"], ["serve", "--demo"]):
        args = parser.parse_args(argv)
        assert (args.temperature, args.top_p) == (0.2, 0.9), argv


@pytest.mark.parametrize("top_p", [0.0, 1e-50, 1.5, float("nan")])
def test_a_top_p_the_selection_cannot_hold_is_refused(top_p):
    """1e-50 is 0 in fp32, where the selection runs: the reference then kept no column at all."""
    with pytest.raises(EchoXError, match="top-p must be in"):
        SamplingParams(temperature=0.5, top_p=top_p)
    assert SamplingParams(temperature=0.5, top_p=1e-40).top_p == 1e-40  # an fp32 subnormal: the top column only


@pytest.mark.parametrize("temperature", [1e-40, 1e-31, float("inf"), float("nan"), -1.0])
def test_a_temperature_that_cannot_be_divided_by_is_refused(temperature):
    """1e-40 made logits / T overflow: every step picked column 0 (`!!!!`) where greedy picks real
    tokens; inf sampled uniformly over the top-p set."""
    with pytest.raises(EchoXError, match="temperature must be 0 .greedy. or a finite number >= 1e-30"):
        SamplingParams(temperature=temperature)
    assert SamplingParams(temperature=1e-30).temperature == 1e-30 and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("temperature", [1e-30, 1e-4])
def test_the_smallest_temperatures_sample_what_greedy_picks(temperature):
    """Every temperature that sampled before the bound still does: from 1e-30 up (2026-12-02 refused
    all below 1e-4, which worked)."""
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 20
    step = torch.zeros((), dtype=torch.int64)
    tiny = SamplingParams(temperature=temperature, top_p=0.9)
    assert torch.equal(select_reference(logits, tiny, step), logits.argmax(-1))
