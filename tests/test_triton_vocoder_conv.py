"""The vocoder conv kernels against the torch references (interpreter on CPU), and the streaming
vocoder run on them."""

import types

import pytest
import torch
import torch.nn.functional as F

from echox import backend
from echox.config import VocoderConfig
from echox.vocoder_ops import conv1d_valid_reference, conv_transpose1d_window_reference
from echox_kernels import vocoder_conv
from echox_kernels.vocoder_conv import conv1d_valid, conv_transpose1d_window

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("exact_fp32_convs")  # conftest.py
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # abs and rel, unit-scale outputs


@pytest.fixture(params=["gpu-tiles", "interpreter-tiles"])
def tiles(request, monkeypatch):
    """Run each case with the GPU's tile sizes too, so several tiles and their edges are exercised."""
    if request.param == "gpu-tiles":
        monkeypatch.setattr(vocoder_conv, "INTERPRETER_TILES", vocoder_conv.GPU_TILES)
    return request.param


def make(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def conv_operands(batch, cin, cout, kernel, length, dtype, seed=0, transposed=False):
    """x [B, Cin, L], weight scaled for unit-size outputs, bias."""
    weight_shape = (cin, cout, kernel) if transposed else (cout, cin, kernel)
    return (make(batch, cin, length, dtype=dtype, seed=seed),
            make(*weight_shape, dtype=dtype, seed=seed + 1, scale=(cin * kernel) ** -0.5),
            make(cout, dtype=dtype, seed=seed + 2))


def assert_matches(out, expected, dtype):
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (7, 3), (11, 5), (3, 5)])
@pytest.mark.parametrize("cin, cout", [(24, 80), (16, 1), (5, 3)], ids=["dot", "conv_post", "narrow"])
def test_conv1d_valid_fp32(tiles, cin, cout, kernel, dilation):
    x, weight, bias = conv_operands(2, cin, cout, kernel, 140 + (kernel - 1) * dilation, torch.float32, seed=kernel)
    residual = make(2, cout, 140, seed=3)
    for slope, res in [(0.1, residual), (1.0, None)]:
        assert_matches(conv1d_valid(x, weight, bias, dilation, slope, res),
                       conv1d_valid_reference(x, weight, bias, dilation, slope, res), torch.float32)


@pytest.mark.parametrize("cin, cout", [(32, 16), (16, 1)], ids=["dot", "conv_post"])
def test_conv1d_valid_fp16(cin, cout):
    x, weight, bias = conv_operands(1, cin, cout, 7, 60, torch.float16)
    residual = make(1, cout, 60 - 6 * 3, dtype=torch.float16, seed=4)
    assert_matches(conv1d_valid(x, weight, bias, 3, 0.01, residual),
                   conv1d_valid_reference(x, weight, bias, 3, 0.01, residual), torch.float16)


def test_conv1d_valid_strided_input_and_empty_output():
    x, weight, bias = conv_operands(1, 8, 16, 3, 40, torch.float32)
    sliced = x[..., 5:30]  # a cache-like view: not contiguous
    assert_matches(conv1d_valid(sliced, weight, bias, 1, 0.1), conv1d_valid_reference(sliced, weight, bias, 1, 0.1),
                   torch.float32)
    assert conv1d_valid(x[..., :2], weight, bias, 1).shape == (1, 16, 0)


def full_length(length, kernel, stride):
    return (length - 1) * stride + kernel


@pytest.mark.parametrize("kernel, stride", [(11, 5), (8, 4), (4, 2)])  # the released ups
@pytest.mark.parametrize("cin, cout", [(24, 20), (6, 3)], ids=["dot", "narrow"])
def test_conv_transpose1d_window_fp32(tiles, cin, cout, kernel, stride):
    length = 30
    x, weight, bias = conv_operands(2, cin, cout, kernel, length, torch.float32, seed=kernel, transposed=True)
    full = full_length(length, kernel, stride)
    # the whole output, odd starts, a single step, and the streaming window of the released padding
    pad = (kernel - stride) // 2
    for start, count in [(0, full), (3, full - 8), (7, 1), (2 * stride + 1, 2 * stride + 3), (pad, full - 2 * pad)]:
        assert_matches(conv_transpose1d_window(x, weight, bias, stride, start, count, 0.1),
                       conv_transpose1d_window_reference(x, weight, bias, stride, start, count, 0.1), torch.float32)


def test_conv_transpose1d_window_spans_tiles(tiles):
    """Enough inputs that each phase needs several time tiles at GPU sizes; no activation."""
    x, weight, bias = conv_operands(1, 4, 16, 8, 300, torch.float32, transposed=True)
    assert_matches(conv_transpose1d_window(x, weight, bias, 4, 5, 1150),
                   conv_transpose1d_window_reference(x, weight, bias, 4, 5, 1150), torch.float32)


@pytest.mark.parametrize("kernel, stride, cout", [(11, 5, 16), (4, 2, 3)])
def test_conv_transpose1d_window_fp16(kernel, stride, cout):
    x, weight, bias = conv_operands(1, 32, cout, kernel, 20, torch.float16, transposed=True)
    count = full_length(20, kernel, stride) - 9
    assert_matches(conv_transpose1d_window(x, weight, bias, stride, 5, count, 0.1),
                   conv_transpose1d_window_reference(x, weight, bias, stride, 5, count, 0.1), torch.float16)


def test_conv_transpose1d_window_empty():
    x, weight, bias = conv_operands(1, 4, 16, 8, 3, torch.float32, transposed=True)
    assert conv_transpose1d_window(x, weight, bias, 4, 6, 0).shape == (1, 16, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cin, cout, kernel, dilation, length", [
    (128, 512, 7, 1, 400), (256, 256, 11, 5, 2000), (32, 32, 7, 3, 20000), (16, 1, 7, 1, 64000)],
    ids=["conv_pre", "stage0-resblock", "stage3-resblock", "conv_post"])
def test_conv1d_valid_real_shapes_on_gpu(dtype, cin, cout, kernel, dilation, length):
    x, weight, bias = conv_operands(1, cin, cout, kernel, length, dtype)
    residual = make(1, cout, length - (kernel - 1) * dilation, dtype=dtype, seed=5)
    assert_matches(conv1d_valid(x, weight, bias, dilation, 0.1, residual),
                   conv1d_valid_reference(x, weight, bias, dilation, 0.1, residual), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cin, cout, kernel, stride, length", [
    (512, 256, 11, 5, 400), (256, 128, 8, 4, 2000), (32, 16, 4, 2, 16000)])
def test_conv_transpose1d_window_real_shapes_on_gpu(dtype, cin, cout, kernel, stride, length):
    x, weight, bias = conv_operands(1, cin, cout, kernel, length, dtype, transposed=True)
    start, count = stride + 1, (length - 2) * stride
    assert_matches(conv_transpose1d_window(x, weight, bias, stride, start, count, 0.1),
                   conv_transpose1d_window_reference(x, weight, bias, stride, start, count, 0.1), dtype)


@pytest.mark.parametrize("units, chunk", [(8, 1), (10, 3), (10, 50)])
def test_streaming_on_triton_equals_offline(monkeypatch, kernel_calls, units, chunk):
    from echox.streaming_vocoder import StreamingVocoder
    from test_vocoder import random_vocoder
    calls = kernel_calls(vocoder_conv, "conv1d_valid"), kernel_calls(vocoder_conv, "conv_transpose1d_window")
    monkeypatch.setenv("ECHOX_BACKEND", "triton")
    vocoder = random_vocoder().to(DEVICE)
    ids = torch.randint(0, 1000, (units,), generator=torch.Generator().manual_seed(units)).to(DEVICE)
    stream = StreamingVocoder(vocoder)
    wave = torch.cat([stream.push(ids[i:i + chunk]) for i in range(0, units, chunk)] + [stream.flush()])
    assert all(calls)  # the stream ran on the kernels (the offline vocoder runs torch's own convs)
    offline = vocoder(ids)
    assert wave.shape == offline.shape
    assert (wave - offline).abs().max() <= 1e-4


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x with the 10-bit mantissa the tensor cores read (round to nearest, ties away: cvt.rna.tf32);
    fp64 as it is (the duration predictor's convs, which no kernel runs)."""
    if x.dtype == torch.float64:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def waveform_error(fast: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = (fast - exact).float()
    return diff.abs().max().item(), (diff.norm() / exact.float().norm()).item()


def test_tf32_waveform_stays_within_the_stated_tolerance(monkeypatch):
    """The released architecture (512 channels, five stages) with every conv's operands rounded to
    TF32, as the fast path's tensor cores round them, against exact fp32: the audio moves by about
    7e-4 at most and 1.3e-3 in relative L2, inside the stated bounds with a 2.5x margin."""
    from test_vocoder import random_vocoder
    vocoder = random_vocoder(VocoderConfig(), seed=1).eval()
    ids = torch.randint(0, 1000, (25,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = vocoder(ids)
        conv1d, conv_transpose1d = F.conv1d, F.conv_transpose1d
        monkeypatch.setattr(F, "conv1d", lambda x, w, *args, **kw: conv1d(tf32(x), tf32(w), *args, **kw))
        monkeypatch.setattr(F, "conv_transpose1d",
                            lambda x, w, *args, **kw: conv_transpose1d(tf32(x), tf32(w), *args, **kw))
        fast = vocoder(ids)
    max_abs, relative_l2 = waveform_error(fast, exact)
    assert 0 < max_abs <= vocoder_conv.TF32_MAX_ABS_ERROR and relative_l2 <= vocoder_conv.TF32_RELATIVE_L2_ERROR


@pytest.mark.parametrize("dtype, allow_tf32, expected", [
    (torch.float32, True, "triton"), (torch.float32, False, "cuda"), (torch.bfloat16, False, "triton")])
def test_gpu_dispatch_runs_vocoder_convs_on_the_tensor_cores(monkeypatch, dtype, allow_tf32, expected):
    """With both kernels built: Triton (tl.dot on tensor cores) unless exact fp32 is asked for."""
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    torch.backends.cudnn.allow_tf32 = allow_tf32  # restored by exact_fp32_convs
    on_gpu = types.SimpleNamespace(is_cuda=True, dtype=dtype)
    assert backend.choose("conv1d_valid", on_gpu) == expected
    assert backend.choose("conv_transpose1d_window", on_gpu) == expected
    assert backend.choose("head_select", on_gpu) == "cuda"
    assert vocoder_conv.dot_precision(dtype) == ("ieee" if expected == "cuda" else "tf32")


@pytest.mark.gpu
def test_tf32_streaming_vocoder_on_gpu_within_tolerance(monkeypatch):
    """The fast path end to end: the released architecture streamed through the Triton convs in
    TF32 against the offline vocoder in exact fp32."""
    from echox.streaming_vocoder import StreamingVocoder
    from test_vocoder import random_vocoder
    vocoder = random_vocoder(VocoderConfig(), seed=1).to(DEVICE)
    ids = torch.randint(0, 1000, (60,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        exact = vocoder(ids)
        torch.backends.cudnn.allow_tf32 = True  # restored by exact_fp32_convs
        monkeypatch.setenv("ECHOX_BACKEND", "triton")
        stream = StreamingVocoder(vocoder)
        fast = torch.cat([stream.push(ids[i:i + 25]) for i in range(0, 60, 25)] + [stream.flush()])
    max_abs, relative_l2 = waveform_error(fast, exact)
    assert max_abs <= vocoder_conv.TF32_MAX_ABS_ERROR and relative_l2 <= vocoder_conv.TF32_RELATIVE_L2_ERROR
