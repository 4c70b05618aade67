"""The vocoder conv ops: the torch references say what the vocoder's layers compute, and the
dispatch hands the same arguments to every backend."""

import pytest
import torch
import torch.nn.functional as F

from echox.errors import EchoXError
from echox.vocoder_ops import (conv1d_valid, conv1d_valid_reference, conv_transpose1d_window,
                               conv_transpose1d_window_reference)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (7, 3), (11, 5)])
def test_conv1d_valid_is_a_resblock_step(kernel, dilation):
    """With zero padding around x, conv1d_valid of raw inputs is the offline conv2(lrelu(.)) + x."""
    x, weight, bias = randn(1, 6, 30, seed=1), randn(6, 6, kernel, seed=2), randn(6, seed=3)
    pad = (kernel - 1) * dilation // 2
    padded = F.pad(x, (pad, pad))
    expected = F.conv1d(F.leaky_relu(x, 0.1), weight, bias, dilation=dilation, padding=pad) + x
    assert torch.equal(conv1d_valid_reference(padded, weight, bias, dilation, 0.1, residual=x), expected)


def test_slope_one_is_no_activation():
    x, weight, bias = randn(2, 3, 12), randn(4, 3, 3, seed=1), randn(4, seed=2)
    assert torch.equal(conv1d_valid_reference(x, weight, bias, 2), F.conv1d(x, weight, bias, dilation=2))
    assert conv1d_valid_reference(x, weight, bias, 2).shape == (2, 4, 12 - 2 * 2)


@pytest.mark.parametrize("kernel, stride", [(11, 5), (8, 4), (4, 2)])
def test_conv_transpose1d_window_is_a_slice_of_the_padded_conv(kernel, stride):
    """The released layer (padding (k - s) / 2) is the window starting at the padding."""
    x, weight, bias = randn(1, 5, 9, seed=1), randn(5, 3, kernel, seed=2), randn(3, seed=3)
    pad = (kernel - stride) // 2
    expected = F.conv_transpose1d(F.leaky_relu(x, 0.1), weight, bias, stride=stride, padding=pad)
    window = conv_transpose1d_window_reference(x, weight, bias, stride, pad, expected.shape[-1], 0.1)
    assert torch.equal(window, expected)


def test_conv_transpose1d_window_must_lie_inside_the_output():
    x, weight, bias = randn(1, 2, 4), randn(2, 2, 4), randn(2)
    with pytest.raises(AssertionError, match="outside"):
        conv_transpose1d_window_reference(x, weight, bias, 2, 5, 6)  # full length (4 - 1) * 2 + 4 = 10


def test_half_inputs_accumulate_in_fp32():
    x, weight, bias = randn(1, 64, 20), randn(8, 64, 3, seed=1) / 8, randn(8, seed=2)
    out = conv1d_valid_reference(x.half(), weight.half(), bias.half(), 1, 0.1)
    expected = F.conv1d(F.leaky_relu(x.half().float(), 0.1), weight.half().float(), bias.half().float())
    assert out.dtype == torch.float16
    assert torch.equal(out, expected.half())


def test_dispatch_runs_the_triton_kernels_with_the_same_arguments(kernel_calls):
    from echox_kernels import vocoder_conv
    calls = kernel_calls(vocoder_conv, "conv1d_valid"), kernel_calls(vocoder_conv, "conv_transpose1d_window")
    x, weight, bias, residual = randn(1, 4, 20), randn(16, 4, 3, seed=1), randn(16, seed=2), randn(1, 16, 14, seed=3)
    torch.testing.assert_close(conv1d_valid(x, weight, bias, 3, 0.1, residual, backend_name="triton"),
                               conv1d_valid(x, weight, bias, 3, 0.1, residual, backend_name="torch"),
                               atol=1e-5, rtol=0)
    up, up_bias = randn(4, 16, 8, seed=4), randn(16, seed=5)
    torch.testing.assert_close(conv_transpose1d_window(x, up, up_bias, 4, 3, 50, 0.1, backend_name="triton"),
                               conv_transpose1d_window(x, up, up_bias, 4, 3, 50, 0.1, backend_name="torch"),
                               atol=1e-5, rtol=0)
    assert [len(c) for c in calls] == [1, 1]  # the Triton calls only


def test_cuda_backend_on_cpu_is_a_clear_error():
    x, weight, bias = randn(1, 2, 5), randn(2, 2, 3), randn(2)
    with pytest.raises(EchoXError, match="conv1d_valid: the CUDA backend"):
        conv1d_valid(x, weight, bias, 1, backend_name="cuda")
