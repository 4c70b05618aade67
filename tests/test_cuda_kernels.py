"""The CUDA kernels of echox_cuda against their torch references, at EchoX shapes (GPU only).

Uses the installed extension (`pip install --no-build-isolation -e .`), or builds it on the fly
from csrc/ when nvcc and ninja are there. Attention and the vocoder convs must match within the
rounding of their dtype; selection must pick the very same rows: greedy always, sampling for
the same seed/step.
"""

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from echox.attention import decode_attention_reference
from echox.sampling import SamplingParams, head_select
from echox.vocoder_ops import conv1d_valid_reference, conv_transpose1d_window_reference

pytestmark = pytest.mark.gpu

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DTYPES = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def ext():
    try:
        return importlib.import_module("echox_cuda")
    except ImportError:
        pass
    if os.environ.get("ECHOX_CUDA_NO_REBUILD"):  # bench/gpu.sh: its build phase tried, and its log says why
        pytest.skip("echox_cuda did not build in the install; not rebuilt in the test's time")
    from torch.utils.cpp_extension import is_ninja_available, load
    if shutil.which("nvcc") is None or not is_ninja_available():
        pytest.skip("echox_cuda is not installed (pip install --no-build-isolation -e .) "
                    "and cannot be built here (needs nvcc and ninja)")
    sources = [str(p) for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))]
    return load("echox_cuda", sources, extra_cuda_cflags=["-O3"], extra_cflags=["-O3"])


def attention_inputs(batch, q_heads, kv_heads, dim, max_len, dtype, lengths, length_dtype=torch.int32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, max_len, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, max_len, dim, device="cuda", generator=g).to(dtype)
    key_valid = torch.rand(batch, max_len, device="cuda", generator=g) > 0.1  # eot keys are masked (SPEC §5)
    key_valid[:, 0] = True
    return q, k, v, torch.tensor(lengths, device="cuda", dtype=length_dtype), key_valid


# (batch, q heads, kv heads, head dim, cache size, lengths): EchoX-8B and 3B LLM layers, the echo
# decoder bodies (MHA at head dim 64), a group of 8 (two head tiles) and the tiny test model.
ATTENTION_SHAPES = {
    "8b": (1, 32, 8, 128, 4096, [3001]),
    "8b-batch": (4, 32, 8, 128, 2048, [1, 77, 2048, 1500]),
    "3b": (2, 24, 8, 128, 1024, [1024, 513]),
    "echo-small": (1, 8, 8, 64, 2048, [700]),
    "echo-12": (2, 12, 12, 64, 512, [5, 300]),
    "group-8": (1, 16, 2, 128, 256, [200]),
    "tiny": (3, 4, 2, 16, 64, [1, 33, 64]),
}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES.values(), ids=ATTENTION_SHAPES.keys())
def test_decode_attention_matches_reference(ext, shape, dtype):
    q, k, v, lengths, key_valid = attention_inputs(*shape, dtype=dtype)
    out = ext.decode_attention(q, k, v, lengths, key_valid)
    ref = decode_attention_reference(q, k, v, lengths, key_valid)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_decode_attention_int64_lengths_and_garbage_past_length(ext):
    q, k, v, lengths, key_valid = attention_inputs(2, 32, 8, 128, 512, torch.bfloat16, [100, 400], torch.int64)
    expected = ext.decode_attention(q, k, v, lengths.int(), key_valid)
    k[0, :, 100:] = float("nan")  # slots past the length are never read
    v[1, :, 400:] = float("nan")
    out = ext.decode_attention(q, k, v, lengths, key_valid)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_decode_attention_of_no_sequence_or_no_head_is_empty(ext):
    """Its split count divided by the block count, 0 here: the process died (SIGFPE)."""
    for batch, q_heads in ((0, 4), (1, 0)):
        q, k, v, lengths, valid = attention_inputs(batch, q_heads, 2, 16, 8, torch.float32, [3] * batch)
        assert ext.decode_attention(q, k, v, lengths, valid).shape == q.shape


def test_decode_attention_replays_in_a_cuda_graph(ext):
    """No host sync: the launch captures, and lengths changed in place take effect on replay."""
    q, k, v, lengths, key_valid = attention_inputs(1, 32, 8, 128, 1024, torch.bfloat16, [10])
    ext.decode_attention(q, k, v, lengths, key_valid)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ext.decode_attention(q, k, v, lengths, key_valid)
    for n in (10, 511, 1024):
        lengths.fill_(n)
        graph.replay()
        ref = decode_attention_reference(q, k, v, lengths, key_valid)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def head_inputs(batch, width, rows, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(batch, width, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(rows, width, device="cuda", generator=g) * 0.02).to(dtype)
    return hidden, weight


def select(ext, hidden, weight, params, step):
    return ext.head_select(hidden, weight, params.temperature, params.top_p, params.top_k, params.seed, step)


def expected(hidden, weight, params, step):
    return head_select(hidden, weight, params, step, backend_name="torch")


# (batch, hidden width, head rows): the EchoX-8B and 3B LM heads (V = 128257), the echo decoder's
# full head (V + U) and a restricted unit head, a batch beyond one batch tile, a tiny head.
HEAD_SHAPES = {
    "8b-lm": (1, 4096, 128257),
    "3b-lm": (2, 3072, 128257),
    "echo-full": (1, 4096, 136449),
    "unit-head": (1, 512, 8193),
    "batch-5": (5, 768, 8193),
    "tiny": (2, 64, 300),
}
SAMPLING = {
    "released": SamplingParams(temperature=0.2, top_p=0.9, seed=7),
    "plain": SamplingParams(temperature=1.0, seed=1),
    "top-k": SamplingParams(temperature=0.8, top_k=50, seed=2),
    "top-k-p": SamplingParams(temperature=1.0, top_p=0.8, top_k=20, seed=3),
    "hot-top-p": SamplingParams(temperature=4.0, top_p=0.95, seed=4),
    # temperatures whose reciprocal is inexact: logits / T must round as the reference rounds it
    "cool-plain": SamplingParams(temperature=0.3, seed=5),
    "cool-top-k-p": SamplingParams(temperature=0.7, top_p=0.85, top_k=40, seed=6),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
def test_greedy_is_identical(ext, shape, dtype):
    hidden, weight = head_inputs(*shape, dtype=dtype)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    params = SamplingParams()
    assert torch.equal(select(ext, hidden, weight, params, step), expected(hidden, weight, params, step))


def test_greedy_ties_go_to_the_lowest_row(ext):
    hidden, weight = head_inputs(1, 256, 5000, torch.bfloat16)
    weight[[4000, 17, 2500]] = hidden[0] * 0.1  # three equal, largest logits
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    assert select(ext, hidden, weight, SamplingParams(), step).tolist() == [17]


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLING["plain"], SAMPLING["released"]],
                         ids=["greedy", "plain", "released"])
def test_a_row_of_no_comparable_logit_selects_row_0(ext, params):
    """NaN or -inf everywhere (an overflowed hidden state): row 0, as torch.argmax answers for -inf,
    never the INT_MAX the argmax starts from (an embedding index far out of range)."""
    hidden, weight = head_inputs(2, 64, 300, torch.float16)
    hidden[0], hidden[1] = float("nan"), 0.0
    hidden[1, 0], weight[:, 0] = float("inf"), -1.0  # row 1: -inf in every logit
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    assert select(ext, hidden, weight, params, step).tolist() == [0, 0]


def test_head_select_of_no_rows_or_no_batch(ext):
    hidden, weight = head_inputs(0, 64, 300, torch.float16)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    assert select(ext, hidden, weight, SamplingParams(), step).shape == (0,)
    with pytest.raises(RuntimeError, match="the head has no rows"):
        select(ext, *head_inputs(1, 64, 0, torch.float16), SamplingParams(), step)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", SAMPLING.values(), ids=SAMPLING.keys())
@pytest.mark.parametrize("shape", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
def test_sampling_is_identical_for_a_seed_and_step(ext, shape, params, dtype):
    hidden, weight = head_inputs(*shape, dtype=dtype)
    for n in (0, 1, 12345):
        step = torch.tensor([n], dtype=torch.int64, device="cuda")
        got, want = select(ext, hidden, weight, params, step), expected(hidden, weight, params, step)
        assert torch.equal(got, want), f"step {n}: kernel drew {got.tolist()}, reference {want.tolist()}"


@pytest.mark.parametrize("params", [SAMPLING["released"], SAMPLING["plain"], SAMPLING["top-k-p"]],
                         ids=["released", "plain", "top-k-p"])
def test_a_counter_per_row_draws_what_each_row_draws_alone(ext, params):
    """Six conversations at different steps (two batch tiles) share one read of the 8B head."""
    hidden, weight = head_inputs(6, 4096, 128257, torch.bfloat16)
    counters = torch.tensor([0, 7, 3, 12345, 1, 2], dtype=torch.int64, device="cuda")
    alone = torch.cat([select(ext, hidden[i:i + 1], weight, params, counters[i:i + 1]) for i in range(6)])
    assert torch.equal(select(ext, hidden, weight, params, counters), alone)
    assert torch.equal(expected(hidden, weight, params, counters), alone)


def test_top_k_one_is_greedy(ext):
    hidden, weight = head_inputs(3, 1024, 20000, torch.float16)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    picked = select(ext, hidden, weight, SamplingParams(temperature=1.0, top_k=1), step)
    assert torch.equal(picked, select(ext, hidden, weight, SamplingParams(), step))


@pytest.mark.parametrize("params", [SAMPLING["released"], SAMPLING["plain"]], ids=["released", "plain"])
def test_head_select_replays_in_a_cuda_graph(ext, params):
    """The step counter lives on the GPU: bumping it in place changes the draw on replay."""
    hidden, weight = head_inputs(1, 4096, 128257, torch.bfloat16)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    select(ext, hidden, weight, params, step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token = select(ext, hidden, weight, params, step)
    for n in range(4):
        step.fill_(n)
        graph.replay()
        assert torch.equal(token, expected(hidden, weight, params, step))


CONV_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def conv_inputs(x_shape, w_shape, cout, dtype, seed=0):
    """x ~ N(0, 1); weights scaled by 1 / sqrt(Cin * K), so outputs stay O(1) as in the vocoder."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*x_shape, device="cuda", generator=g)
    w = torch.randn(*w_shape, device="cuda", generator=g) / (x_shape[1] * w_shape[2]) ** 0.5
    b = torch.randn(cout, device="cuda", generator=g) * 0.1
    return x.to(dtype), w.to(dtype), b.to(dtype)


def random_like(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


# (batch, Cin, Cout, kernel, dilation, input length, input slope, with residual): the released
# vocoder's convs as the streaming vocoder calls them, inputs = new steps + (K - 1) * dilation of
# cache. Pushes of one frame (5, 20, 80, 160, 320 steps per stage) and of 50 frames (one second).
CONV1D_SHAPES = {
    "conv_pre-1": (1, 128, 512, 7, 1, 1 + 6, 1.0, False),
    "conv_pre-50": (1, 128, 512, 7, 1, 50 + 6, 1.0, False),
    "s0-k3-d1-1": (1, 256, 256, 3, 1, 5 + 2, 0.1, False),
    "s0-k11-d5-1": (1, 256, 256, 11, 5, 5 + 50, 0.1, False),
    "s0-k11-d1-50-res": (1, 256, 256, 11, 1, 250 + 10, 0.1, True),
    "s0-k7-d3-50": (1, 256, 256, 7, 3, 250 + 18, 0.1, False),
    "s1-k7-d3-1": (1, 128, 128, 7, 3, 20 + 18, 0.1, False),
    "s1-k11-d5-50-res": (1, 128, 128, 11, 5, 1000 + 50, 0.1, True),
    "s2-k11-d5-1-res": (1, 64, 64, 11, 5, 80 + 50, 0.1, True),
    "s2-k3-d3-50": (1, 64, 64, 3, 3, 4000 + 6, 0.1, False),
    "s3-k7-d5-1": (1, 32, 32, 7, 5, 160 + 30, 0.1, False),
    "s3-k11-d1-50-res": (1, 32, 32, 11, 1, 8000 + 10, 0.1, True),
    "s4-k3-d1-1-res": (1, 16, 16, 3, 1, 320 + 2, 0.1, True),
    "s4-k11-d5-50": (1, 16, 16, 11, 5, 16000 + 50, 0.1, False),
    "conv_post-1": (1, 16, 1, 7, 1, 320 + 6, 0.01, False),
    "conv_post-50": (1, 16, 1, 7, 1, 16000 + 6, 0.01, False),
    "batch-3": (3, 256, 256, 7, 3, 40 + 18, 0.1, True),
    "odd-sizes": (2, 37, 70, 5, 2, 101, 0.2, True),
}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", CONV1D_SHAPES.values(), ids=CONV1D_SHAPES.keys())
def test_conv1d_valid_matches_reference(ext, exact_fp32_convs, shape, dtype):
    batch, cin, cout, kernel, dilation, length, slope, with_residual = shape
    x, w, b = conv_inputs((batch, cin, length), (cout, cin, kernel), cout, dtype)
    out_len = length - (kernel - 1) * dilation
    residual = random_like((batch, cout, out_len), dtype, seed=1) if with_residual else None
    out = ext.conv1d_valid(x, w, b, dilation, slope, residual)
    ref = conv1d_valid_reference(x, w, b, dilation, slope, residual)
    assert out.dtype == dtype and out.shape == (batch, cout, out_len)
    tol = CONV_TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# (batch, Cin, Cout, kernel, stride, input length, window start, window count): the released
# upsampling convs as the streaming vocoder calls them (left and right context of one input, the
# window after the padding), pushes of one and of 50 frames; whole and odd windows.
CONV_TRANSPOSE_SHAPES = {
    "ups0-1": (1, 512, 256, 11, 5, 1 + 2, 8, 5),
    "ups0-50": (1, 512, 256, 11, 5, 50 + 2, 8, 250),
    "ups1-1": (1, 256, 128, 8, 4, 5 + 2, 6, 20),
    "ups1-50": (1, 256, 128, 8, 4, 250 + 2, 6, 1000),
    "ups2-1": (1, 128, 64, 8, 4, 20 + 2, 6, 80),
    "ups2-50": (1, 128, 64, 8, 4, 1000 + 2, 6, 4000),
    "ups3-1": (1, 64, 32, 4, 2, 80 + 2, 3, 160),
    "ups3-50": (1, 64, 32, 4, 2, 4000 + 2, 3, 8000),
    "ups4-1": (1, 32, 16, 4, 2, 160 + 2, 3, 320),
    "ups4-50": (1, 32, 16, 4, 2, 8000 + 2, 3, 16000),
    "whole": (1, 512, 256, 11, 5, 7, 0, 6 * 5 + 11),
    "odd-window": (2, 40, 70, 7, 3, 33, 1, 100),
    "one-channel": (2, 16, 1, 5, 2, 600, 4, 1190),
    "batch-3": (3, 256, 128, 8, 4, 12, 6, 40),
}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", CONV_TRANSPOSE_SHAPES.values(), ids=CONV_TRANSPOSE_SHAPES.keys())
def test_conv_transpose1d_window_matches_reference(ext, exact_fp32_convs, shape, dtype):
    batch, cin, cout, kernel, stride, length, start, count = shape
    x, w, b = conv_inputs((batch, cin, length), (cin, cout, kernel), cout, dtype)
    out = ext.conv_transpose1d_window(x, w, b, stride, start, count, 0.1)
    ref = conv_transpose1d_window_reference(x, w, b, stride, start, count, 0.1)
    assert out.dtype == dtype and out.shape == (batch, cout, count)
    tol = CONV_TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_vocoder_convs_are_deterministic(ext):
    """Input-channel splits are summed in a fixed order: the same call gives the same bits."""
    x, w, b = conv_inputs((1, 256, 5 + 50), (256, 256, 11), 256, torch.bfloat16)
    first = ext.conv1d_valid(x, w, b, 5, 0.1)
    assert all(torch.equal(ext.conv1d_valid(x, w, b, 5, 0.1), first) for _ in range(5))
    x, w, b = conv_inputs((1, 512, 3), (512, 256, 11), 256, torch.bfloat16)
    first = ext.conv_transpose1d_window(x, w, b, 5, 8, 5, 0.1)
    assert all(torch.equal(ext.conv_transpose1d_window(x, w, b, 5, 8, 5, 0.1), first) for _ in range(5))


def test_vocoder_convs_take_slices_and_defaults(ext, exact_fp32_convs):
    """Streaming caches are slices of larger buffers; slope 1.0 (no activation) is the default."""
    x, w, b = conv_inputs((1, 64, 300), (64, 64, 7), 64, torch.float32)
    part = x[..., 17:217]  # not contiguous
    residual = random_like((1, 64, 300), torch.float32, seed=2)[..., :200 - 6 * 3]
    out = ext.conv1d_valid(part, w, b, 3, residual=residual)
    torch.testing.assert_close(out, conv1d_valid_reference(part, w, b, 3, 1.0, residual), atol=1e-4, rtol=1e-4)
    x, w, b = conv_inputs((1, 64, 300), (64, 32, 4), 32, torch.float32)
    out = ext.conv_transpose1d_window(x[..., 100:], w, b, 2, 3, 390)
    ref = conv_transpose1d_window_reference(x[..., 100:], w, b, 2, 3, 390)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_conv1d_valid_long_span_uses_more_shared_memory(ext, exact_fp32_convs):
    """A window beyond 48 KB of shared memory per block opts in to more, rather than failing."""
    x, w, b = conv_inputs((1, 16, 3000), (1, 16, 11), 1, torch.float32)
    out = ext.conv1d_valid(x, w, b, 200, 0.01)
    torch.testing.assert_close(out, conv1d_valid_reference(x, w, b, 200, 0.01), atol=1e-4, rtol=1e-4)


def test_conv1d_valid_without_outputs(ext):
    """Exactly the kernel's span of inputs: no output is complete yet (torch's conv1d refuses this)."""
    x, w, b = conv_inputs((1, 64, 50), (64, 64, 11), 64, torch.bfloat16)
    assert ext.conv1d_valid(x, w, b, 5, 0.1).shape == (1, 64, 0)


def test_vocoder_convs_reject_bad_windows(ext):
    x, w, b = conv_inputs((1, 32, 10), (32, 16, 4), 16, torch.float16)
    with pytest.raises(RuntimeError, match="outside"):
        ext.conv_transpose1d_window(x, w, b, 2, 20, 5)  # 22 outputs in all
    with pytest.raises(RuntimeError, match="fewer than"):
        ext.conv1d_valid(x, w.transpose(0, 1).contiguous(), b, 5)  # span 16 > 10 inputs
    with pytest.raises(RuntimeError, match="bias"):
        ext.conv1d_valid(x, w.transpose(0, 1).contiguous(), b[:8], 1)


def test_vocoder_convs_replay_in_a_cuda_graph(ext):
    """No host sync: both ops capture, and inputs changed in place take effect on replay."""
    x, w, b = conv_inputs((1, 256, 5 + 50), (256, 256, 11), 256, torch.bfloat16)
    xt, wt, bt = conv_inputs((1, 512, 3), (512, 256, 11), 256, torch.bfloat16, seed=3)
    ext.conv1d_valid(x, w, b, 5, 0.1)
    ext.conv_transpose1d_window(xt, wt, bt, 5, 8, 5, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ext.conv1d_valid(x, w, b, 5, 0.1)
        out_t = ext.conv_transpose1d_window(xt, wt, bt, 5, 8, 5, 0.1)
    for seed in (4, 5):
        x.copy_(random_like(x.shape, x.dtype, seed))
        xt.copy_(random_like(xt.shape, xt.dtype, seed + 10))
        graph.replay()
        torch.testing.assert_close(out.float(), conv1d_valid_reference(x, w, b, 5, 0.1).float(), atol=2e-2, rtol=2e-2)
        ref_t = conv_transpose1d_window_reference(xt, wt, bt, 5, 8, 5, 0.1)
        torch.testing.assert_close(out_t.float(), ref_t.float(), atol=2e-2, rtol=2e-2)
