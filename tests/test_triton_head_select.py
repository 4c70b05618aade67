"""The fused head + selection kernel against `select_reference` (interpreter on CPU)."""

import pytest
import torch

from echox.sampling import SamplingParams, allowed_columns, gumbel_noise, select_reference
from echox_kernels import head_select as select
from echox_kernels.head_select import _Launch, head_select, tempered_logits_and_cutoff

BLOCK_R = select.MAX_BLOCK_R

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


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.6, top_k=9, top_p=0.8, seed=2)],
                         ids=["greedy", "top-k+top-p"])
def test_batch_tiles_of_a_large_batch(monkeypatch, params):
    """Five sequences in tiles of two, as a GPU runs batches over 4 (the CTC head takes 64 frames).
    Rows past the first also catch a cutoff read with the wrong stride (it once read the bracket's
    other end for them)."""
    hidden, weight = make_exact_head(5, 2 * BLOCK_R + 3, 16, seed=8)
    monkeypatch.setattr(select, "MAX_BLOCK_B", 2)
    monkeypatch.setattr(select, "INTERPRETER_MAX_BLOCK_B", 2)
    run = _Launch(hidden, weight, 1.0, reciprocal=False)
    assert (run.block_b, run.batch_tiles) == (2, 3)
    step = step_tensor(3)
    assert torch.equal(head_select(hidden, weight, params, step), reference(hidden, weight, params, step))


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


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=0.2, top_p=0.9),
                                    SamplingParams(temperature=1.0, top_k=20, top_p=0.6, seed=5)],
                         ids=["plain", "released", "top-k+top-p"])
def test_a_counter_per_row_draws_what_each_row_draws_alone(monkeypatch, params):
    """Conversations at different steps share one call (one read of the head) with a counter each;
    every row draws what it draws alone at batch 1, across batch tiles too."""
    monkeypatch.setattr(select, "INTERPRETER_MAX_BLOCK_B", 2)
    hidden, weight = make_exact_head(3, 4 * BLOCK_R + 3, 48, seed=9)
    counters = torch.tensor([5, 0, 17], device=DEVICE)
    alone = torch.cat([head_select(hidden[i:i + 1], weight, params, counters[i:i + 1]) for i in range(3)])
    assert torch.equal(head_select(hidden, weight, params, counters), alone)
    assert torch.equal(reference(hidden, weight, params, counters), alone)
    # and the counters matter: one shared counter hashes the rows apart, so other draws
    shared = [head_select(hidden, weight, params, step_tensor(s, (1,))) for s in range(4)]
    assert any(not torch.equal(draw, alone) for draw in shared)


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
    run = _Launch(hidden, weight, params.temperature, reciprocal=False)
    _, cutoff = tempered_logits_and_cutoff(run, params, step_tensor(0), 0)  # [B] order key
    scaled = (hidden.float() @ weight.float().T) / params.temperature
    keep = order_key(scaled) >= cutoff[:, None]
    assert torch.equal(keep, allowed_columns(scaled, params.top_p, params.top_k))


def test_empirical_distribution_matches_softmax():
    """Many batch rows with the same hidden state are independent draws (the row is in the hash).
    The probabilities are spread out (0.05 to 0.5) so that a wrong temperature (1.0 or 0.7 for
    0.8) or noise other than Gumbel moves the counts by many standard errors: Pearson's chi-square
    over the 6 columns must stay under its 0.1% tail for 5 degrees of freedom."""
    draws_per_step, steps, rows = 1024, 2, 6
    hidden, weight = make_head(1, rows, 16, spread=0.5, seed=5)
    params = SamplingParams(temperature=0.8, seed=9)
    many = hidden.expand(draws_per_step, -1).contiguous()
    draws = torch.cat([head_select(many, weight, params, step_tensor(s)) for s in range(steps)])
    counts = torch.bincount(draws.cpu(), minlength=rows).double()
    probs = ((hidden.double() @ weight.double().T)[0] / params.temperature).softmax(-1).cpu()
    expected = probs * draws.numel()
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 20.5, (counts, expected)


def test_tied_columns_are_kept_or_dropped_together():
    """Equal logits share their probability: they are kept or dropped together, as in the reference."""
    hidden, weight = make_head(1, BLOCK_R, 16, seed=2)
    weight[3] = weight[10] = weight[40]  # three tied columns
    params = SamplingParams(temperature=1.0, top_p=0.3, seed=6)
    for step in range(3):
        assert torch.equal(head_select(hidden, weight, params, step_tensor(step)),
                           reference(hidden, weight, params, step_tensor(step)))


class WeightReads:
    """Wraps every kernel of the module and counts the launches that are handed the head weight."""

    def __init__(self, monkeypatch, weight):
        self.weight, self.launches = weight, []
        for name in dir(select):
            kernel = getattr(select, name)
            if name.endswith("_kernel"):
                monkeypatch.setattr(select, name, self.counting(name, kernel))

    def counting(self, name, kernel):
        reads = self

        class Counting:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if any(arg is reads.weight for arg in args):
                        reads.launches.append(name)
                    return kernel[grid](*args, **kwargs)
                return launch
        return Counting()


@pytest.mark.parametrize("params", [
    SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=0.2, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.8),
], ids=["greedy", "plain", "released", "top-k+top-p"])
def test_the_weight_is_read_once_per_token(monkeypatch, params):
    """The head weight is 1 GB at 8B: every extra pass over it costs ~0.3 ms per token."""
    hidden, weight = make_exact_head(1, 3 * BLOCK_R + 5, 16, seed=4)
    reads = WeightReads(monkeypatch, weight)
    head_select(hidden, weight, params, step_tensor(2))
    assert reads.launches == ["_gemv_kernel"]


@pytest.mark.parametrize("rows,width,block_r", [(128257, 4096, 64), (8193, 768, 32), (8193, 512, 32)],
                         ids=["8b-lm", "unit-8x768", "unit-6x512"])
def test_small_heads_get_smaller_tiles_to_fill_the_gpu(rows, width, block_r):
    """The ~8k-row unit head in 64-row tiles was 129 programs for 132 SMs."""
    run = _Launch(torch.empty(1, width, device="meta"), torch.empty(rows, width, device="meta"), 1.0, True)
    assert run.block_r == block_r and run.programs >= select.MIN_PROGRAMS
    assert run.programs * run.rows_per_program >= rows


def reference_on_gpu(hidden, weight, params, step):
    """What select_reference computes with CUDA tensors, here on the CPU: torch's CUDA division by a
    Python scalar multiplies by the fp32 reciprocal (one rounding), then adds the noise."""
    scaled = (hidden.float() @ weight.float().T) * reciprocal_of(params.temperature)
    keep = allowed_columns(scaled, params.top_p, params.top_k)
    noise = gumbel_noise(params.seed, step, *scaled.shape)
    return (scaled + noise).masked_fill(~keep, float("-inf")).argmax(dim=-1)


def reciprocal_of(temperature):
    return torch.tensor(1.0) / torch.tensor(temperature, dtype=torch.float32)


@pytest.mark.parametrize("reciprocal", [False, True], ids=["cpu-division", "gpu-reciprocal"])
def test_tempered_logits_round_as_torch_does_on_the_device(reciprocal):
    """Exact logits (1/8 grid), T = 0.3: logits / T and logits * fp32(1 / T) differ in the last bit of
    some columns, and the stored logits must be the ones torch computes on the kernel's device."""
    params = SamplingParams(temperature=0.3, top_p=0.9)
    hidden, weight = make_exact_head(2, 2 * BLOCK_R + 9, 24, seed=13)
    logits = hidden @ weight.T
    divided, multiplied = logits / params.temperature, logits * reciprocal_of(params.temperature)
    assert not torch.equal(divided, multiplied)
    scaled, _ = tempered_logits_and_cutoff(_Launch(hidden, weight, params.temperature, reciprocal), params,
                                           step_tensor(0), 0)
    assert torch.equal(scaled, multiplied if reciprocal else divided)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.3, seed=8), SamplingParams(temperature=0.2, top_p=0.9, seed=1),
    SamplingParams(temperature=0.6, top_k=7, seed=2), SamplingParams(temperature=0.45, top_k=12, top_p=0.7, seed=3),
], ids=["plain", "released", "top-k", "top-k+top-p"])
def test_gpu_rounding_draws_the_gpu_reference_token(params):
    """Every sampling mode at temperatures other than 1, with the GPU's rounding, against the
    reference as torch computes it on a GPU."""
    hidden, weight = make_head(2, 2 * BLOCK_R + 9, 24, seed=13)
    for step in (0, 5):
        step = step_tensor(step, (1,))
        assert torch.equal(head_select(hidden, weight, params, step, reciprocal=True),
                           reference_on_gpu(hidden, weight, params, step))


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


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.2, top_p=0.9, seed=1)],
                         ids=["greedy", "released"])
def test_dispatch_runs_the_kernel_or_the_torch_path(kernel_calls, params):
    """echox.sampling.head_select: the Triton kernel when asked for (the interpreter here), the fp32
    logits and select_reference otherwise; both choose the same rows on exact logits."""
    from echox.sampling import head_select as dispatched
    hidden, weight = make_exact_head(3, 300, 32, seed=7)
    calls = kernel_calls(select, "head_select")
    by_kernel = dispatched(hidden, weight, params, step_tensor(4), backend_name="triton")
    assert len(calls) == 1
    by_torch = dispatched(hidden, weight, params, step_tensor(4), backend_name="torch")
    assert len(calls) == 1
    assert by_kernel.tolist() == by_torch.tolist() == reference(hidden, weight, params, step_tensor(4)).tolist()
