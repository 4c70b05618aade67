"""The pruning rule of the CUDA head_select's top-p path, checked on the CPU.

Before its single-block selection, csrc/head_select.cu drops (when top-p < 1) every column more
than kCandidateSpan below the row maximum. That is exact when such a column has zero mass in the
kernel's fixed point and is never in the reference's top-p set (so neither the cut nor the draw
can involve it). Both are checked here on the constants as written in the .cu file, and the rule
itself against `select_reference`.
"""

import re
from pathlib import Path

import pytest
import torch

from echox.sampling import SamplingParams, allowed_columns, select_reference

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "head_select.cu"


def cu_constant(name: str) -> float:
    return float(re.search(rf"{name} = ([0-9.]+)f;", SOURCE.read_text()).group(1))


def test_past_the_span_the_mass_is_zero():
    span, mass_scale = cu_constant("kCandidateSpan"), cu_constant("kMassScale")
    assert torch.exp(torch.tensor(-span)) * mass_scale < 1  # truncates to 0 in the kernel's fixed point


def test_the_noise_is_as_bounded_as_the_kernel_says():
    """Its draw keeps 32 - shift bits of the hash, so u stays below 1 and the noise within the
    -2.82 .. 16.64 that the comment on kCandidateSpan relies on (24 bits gave u = 1.0, noise +inf)."""
    shift = int(re.search(r"fmix32\(key\) >> (\d+);", SOURCE.read_text()).group(1))
    bits = 32 - shift
    extremes = torch.tensor([0, (1 << bits) - 1])
    uniform = (extremes.float() + 0.5) * (1.0 / (1 << bits))
    noise = -torch.log(-torch.log(uniform))
    assert uniform[1] < 1 and -2.82 < noise[0] and noise[1] < 16.64, noise


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.2, top_p=0.9, seed=1), SamplingParams(temperature=0.7, top_k=300, top_p=0.95, seed=3),
    SamplingParams(temperature=3.0, top_p=0.5, seed=4), SamplingParams(temperature=1.0, top_p=0.999, seed=5),
], ids=["released", "wide-top-k+top-p", "hot-top-p", "wide-top-p"])
def test_top_p_never_keeps_a_column_past_the_span(params):
    """Logits spread over ~60 units after tempering, so many columns fall past the span: none is in
    the reference's keep set, and with them set to -inf (dropped) every draw is the same."""
    span = cu_constant("kCandidateSpan")
    gen = torch.Generator().manual_seed(params.seed)
    logits = torch.rand(3, 5000, generator=gen) * 60 * params.temperature
    scaled = logits / params.temperature
    past_span = scaled < scaled.amax(-1, keepdim=True) - span
    assert past_span.float().mean() > 0.3
    assert not (allowed_columns(scaled, params.top_p, params.top_k) & past_span).any()
    dropped = logits.masked_fill(past_span, float("-inf"))
    for step in range(8):
        step = torch.tensor(step)
        assert torch.equal(select_reference(dropped, params, step), select_reference(logits, params, step))
