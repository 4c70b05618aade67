"""The vocoder's two conv ops, as the streaming vocoder runs them: torch references and dispatch.

Streaming keeps each layer's raw inputs and asks for exactly the outputs that are complete, so
both ops compute a window of an unpadded convolution, with the leaky relu that precedes every
generator conv applied to the inputs inside the op (slope 1.0: no activation) and, for the
conv1d, the residual add that follows it fused in:
- `conv1d_valid`: y = conv1d(lrelu(x), weight, bias, dilation) (+ residual), no padding;
- `conv_transpose1d_window`: outputs start .. start + count - 1 of the unpadded
  conv_transpose1d(lrelu(x), weight, bias, stride).
Both accumulate in fp32 (fp64 for fp64 inputs, the vocoder's duration predictor's, which only the
torch references take) and return x's dtype. The CUDA bindings take the same arguments.
"""

import torch
import torch.nn.functional as F

from . import backend


def _accumulated(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _activated(x: torch.Tensor, input_slope: float) -> torch.Tensor:
    """lrelu(x) in the accumulation dtype; slope 1.0 is the identity, and x already in it is used as is."""
    x = x.to(_accumulated(x))
    return x if input_slope == 1.0 else F.leaky_relu(x, input_slope)


def conv1d_valid_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int,
                           input_slope: float = 1.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, Cin, L], weight [Cout, Cin, K], bias [Cout], residual [B, Cout, L_out] or None
    -> [B, Cout, L_out], L_out = L - (K - 1) * dilation."""
    wide = _accumulated(x)
    y = F.conv1d(_activated(x, input_slope), weight.to(wide), bias.to(wide), dilation=dilation)
    if residual is not None:
        y = y + residual.to(wide)
    return y.to(x.dtype)


def conv_transpose1d_window_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int,
                                      start: int, count: int, input_slope: float = 1.0) -> torch.Tensor:
    """x [B, Cin, L], weight [Cin, Cout, K], bias [Cout] -> [B, Cout, count]: outputs start ..
    start + count - 1 of the unpadded transposed conv, whose length is (L - 1) * stride + K."""
    full_length = (x.shape[-1] - 1) * stride + weight.shape[-1]
    assert 0 <= start and start + count <= full_length, f"window {start}+{count} outside 0..{full_length}"
    wide = _accumulated(x)
    full = F.conv_transpose1d(_activated(x, input_slope), weight.to(wide), bias.to(wide), stride=stride)
    return full[..., start:start + count].to(x.dtype)


def conv1d_valid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int,
                 input_slope: float = 1.0, residual: torch.Tensor | None = None,
                 backend_name: str | None = None) -> torch.Tensor:
    """`conv1d_valid_reference` through the dispatch: torch reference, Triton or CUDA kernel."""
    which = backend.choose("conv1d_valid", x, backend_name)
    if which == "triton":
        from echox_kernels.vocoder_conv import conv1d_valid as kernel
        return kernel(x, weight, bias, dilation, input_slope, residual)
    if which == "cuda":
        import echox_cuda
        return echox_cuda.conv1d_valid(x, weight, bias, dilation, input_slope, residual)
    return conv1d_valid_reference(x, weight, bias, dilation, input_slope, residual)


def conv_transpose1d_window(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int,
                            start: int, count: int, input_slope: float = 1.0,
                            backend_name: str | None = None) -> torch.Tensor:
    """`conv_transpose1d_window_reference` through the dispatch: torch reference, Triton or CUDA kernel."""
    which = backend.choose("conv_transpose1d_window", x, backend_name)
    if which == "triton":
        from echox_kernels.vocoder_conv import conv_transpose1d_window as kernel
        return kernel(x, weight, bias, stride, start, count, input_slope)
    if which == "cuda":
        import echox_cuda
        return echox_cuda.conv_transpose1d_window(x, weight, bias, stride, start, count, input_slope)
    return conv_transpose1d_window_reference(x, weight, bias, stride, start, count, input_slope)
