"""The fused head + selection kernel against `select_reference` (interpreter on CPU)."""

import pytest
import torch

from echox.sampling import SamplingParams, allowed_columns, select_reference
from echox_kernels.head_select import BLOCK_R, _keep_cutoff, _Launch, head_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_head(batch, rows, width, dtype=torch.float32, spread=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, width, generator=gen)
    weight = torch.randn(rows, width, generator=gen) * spread / width ** 0.5
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def make_exact_head(batch, rows, width, seed=0):
    """Entries on a 1/8 grid: every logit is an exact fp32 sum, so no summation order can change a
    boundary by an ulp (and ties are frequent, which the keep rules must handle alike)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-8, 9, (batch, width), generator=gen) / 8.0
    weight = torch.randint(-8, 9, (rows, width), generator=gen) / 8.0
    return hidden.to(DEVICE), weight.to(DEVICE)


def reference(hidden, weight, params, step):
    return select_reference(hidden.float() @ weight.float().T, params, step)


def step_tensor(value, shape=()):
    return torch.full(shape, value, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_is_the_reference_argmax(dtype):
    hidden, weight = make_head(3, 5 * BLOCK_R + 7, 96, dtype)
    params = SamplingParams()
    assert torch.equal(head_select(hidden, weight, params, step_tensor(0)), reference(hidden, weight, params, step_tensor(0)))


def test_greedy_ties_go_to_the_lowest_row():
    hidden, weight = make_head(2, 3 * BLOCK_R, 32)
    weight[BLOCK_R + 5] = weight[2 * BLOCK_R + 1] = weight[7] = 10 * hidden[0] / hidden[0].norm()
    out = head_select(hidden, weight, SamplingParams(), step_tensor(0))
    assert out[0].item() == 7


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, seed=3),
    SamplingParams(temperature=0.2, top_p=0.9, seed=1),  # the released setting
    SamplingParams(temperature=1.0, top_p=0.5, seed=2),
    SamplingParams(temperature=1.3, top_k=5, seed=4),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.6, seed=5),
], ids=["plain", "released", "top-p", "top-k", "top-k+top-p"])
def test_sampling_draws_the_reference_token(params):
    hidden, weight = make_exact_head(2, 4 * BLOCK_R + 3, 48, seed=7)
    for step in (0, 1, 17):
        assert torch.equal(head_select(hidden, weight, params, step_tensor(step, (1,))),
                           reference(hidden, weight, params, step_tensor(step, (1,)))), f"step {step}"


def order_key(x: torch.Tensor) -> torch.Tensor:
    """The kernel's fp32 -> order-preserving int32 map, in torch."""
    bits = (x + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=0.2, top_p=0.9),
    SamplingParams(temperature=2.0, top_k=9), SamplingParams(temperature=0.5, top_k=30, top_p=0.8),
    SamplingParams(temperature=3.0, top_p=0.999), SamplingParams(temperature=0.7, top_k=1),
], ids=["top-p", "released", "top-k", "top-k+top-p", "wide-top-p", "top-1"])
def test_keep_set_is_the_reference_set(params):
    hidden, weight = make_exact_head(2, 3 * BLOCK_R + 1, 16, seed=11)
    cutoff = _keep_cutoff(_Launch(hidden, weight, params.temperature), params)  # [B] order key
    scaled = (hidden.float() @ weight.float().T) / params.temperature
    keep = order_key(scaled) >= cutoff[:, None]
    assert torch.equal(keep, allowed_columns(scaled, params.top_p, params.top_k))


def test_empirical_distribution_matches_softmax():
    """Many batch rows with the same hidden state are independent draws (the row is in the hash)."""
    draws_per_step, steps, rows = 64, 16, 6
    hidden, weight = make_head(1, rows, 16, spread=2.0, seed=5)
    params = SamplingParams(temperature=0.8, seed=9)
    many = hidden.expand(draws_per_step, -1).contiguous()
    draws = torch.cat([head_select(many, weight, params, step_tensor(s)) for s in range(steps)])
    freq = torch.bincount(draws.cpu(), minlength=rows).float() / draws.numel()
    expected = ((hidden.float() @ weight.float().T)[0] / params.temperature).softmax(-1).cpu()
    assert (freq - expected).abs().max() < 0.05, (freq, expected)


def test_tied_columns_are_kept_or_dropped_together():
    """Equal logits share their probability: they are kept or dropped together, as in the reference."""
    hidden, weight = make_head(1, BLOCK_R, 16, seed=2)
    weight[3] = weight[10] = weight[40]  # three tied columns
    params = SamplingParams(temperature=1.0, top_p=0.3, seed=6)
    for step in range(3):
        assert torch.equal(head_select(hidden, weight, params, step_tensor(step)),
                           reference(hidden, weight, params, step_tensor(step)))


@pytest.mark.gpu
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.2, top_p=0.9, seed=1)],
                         ids=["greedy", "released"])
def test_llm_vocab_bf16_on_gpu(params):
    """EchoX-8B head size; exact-grid weights keep the bf16 logits free of summation-order ulps."""
    hidden, weight = make_exact_head(2, 128257, 4096, seed=3)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    for step in range(3):
        assert torch.equal(head_select(hidden, weight, params, step_tensor(step)),
                           reference(hidden, weight, params, step_tensor(step)))
