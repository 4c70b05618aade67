"""The streaming vocoder's convs in Triton: a valid dilated conv1d and a window of a transposed one.

Contract: exactly `echox.vocoder_ops.conv1d_valid_reference` and
`conv_transpose1d_window_reference`: the leaky relu (input_slope; 1.0 is none) applied to the
inputs, fp32 accumulation, bias and the optional residual added to the fp32 result, output in
x's dtype.

Both are implicit GEMMs: a program computes one [BLOCK_CO, BLOCK_T] tile of outputs (output
channels x time) and reduces over a flat index r of (input channel, tap) in BLOCK_R steps,
gathering its input tile [BLOCK_R, BLOCK_T] straight from x, so no im2col buffer is written.
- conv1d: y[co, t] = sum over (ci, k) of W[co, ci, k] x[ci, t + k * dilation], with r = ci * K + k,
  the order of W's own memory.
- transposed conv: output t = q * stride + p (phase p) gets tap k = p + m * stride from input
  q - m, m = 0 .. TAPS - 1, TAPS = ceil(K / stride). For one phase that is an ordinary conv over
  q, so a program owns one phase and BLOCK_T consecutive q, reducing over r = ci * TAPS + m
  (taps past K masked): no multiplications by the zeros a zero-stuffed input would hold.
Where the output has >= 16 channels the tile product is a tl.dot on the tensor cores; narrower
outputs (conv_post has one channel) use a broadcast multiply-sum. fp32 operands go to the
tensor cores as TF32 exactly when torch lets its own GPU convolutions do so
(`torch.backends.cudnn.allow_tf32`, on by default, as it was for the released fp32 vocoder on
Ampere and later GPUs): the fast path. TF32 keeps 10 mantissa bits of each operand, with fp32
sums; on the released architecture that moves the waveform by about 7e-4 at most and 1.3e-3 in
relative L2 (tests hold it under TF32_MAX_ABS_ERROR and TF32_RELATIVE_L2_ERROR). With the flag off,
the dot runs in IEEE fp32 (exact mode).
Tile sizes come from shapes only: on a GPU the largest tile of GPU_TILES, halved in time and
then in channels until the grid has about two programs per SM, since a push of a few frames would
otherwise leave most SMs idle; in the CPU interpreter the larger INTERPRETER_TILES.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .sm_count import sm_count

DOT_MIN = 16  # the smallest tl.dot tile side
TF32_MAX_ABS_ERROR = 2e-3  # the waveform error the TF32 fast path is held to (samples in [-1, 1])
TF32_RELATIVE_L2_ERROR = 3e-3


@dataclass(frozen=True)
class TileLimits:
    block_co: int  # most output channels per tile
    block_t: int  # most output steps per tile
    block_r: int  # reduction step of a 16-bit tl.dot (fp32 takes half)
    broadcast: int  # most elements of the broadcast path's [BLOCK_CO, BLOCK_R, BLOCK_T] product


GPU_TILES = TileLimits(block_co=64, block_t=128, block_r=64, broadcast=4096)
# The interpreter pays a fixed Python cost per op of a program whatever the tile size, so on the
# CPU the fewest, largest tiles run fastest (tests only: timings there say nothing).
INTERPRETER_TILES = TileLimits(block_co=128, block_t=1024, block_r=256, broadcast=1 << 16)


@triton.jit
def _accumulate(acc, w, x, input_slope, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_CO, BLOCK_T] fp32 += w [BLOCK_CO, BLOCK_R] @ leaky_relu(x [BLOCK_R, BLOCK_T])."""
    x = x.to(tl.float32)
    x = tl.where(x >= 0, x, x * input_slope)
    if USE_DOT:
        acc += tl.dot(w, x.to(w.dtype), input_precision=DOT_PRECISION)  # 16-bit x back to the tensor cores
    else:
        acc += tl.sum(w.to(tl.float32)[:, :, None] * x[None, :, :], axis=1)
    return acc


@triton.jit
def _finish(acc, bias_ptr, residual_ptr, out_ptr, b, co, cols, out_channels, out_len, HAS_RESIDUAL: tl.constexpr):
    """out[b, co, cols] = acc + bias (+ residual[b, co, cols]); out, residual [B, Cout, out_len]."""
    co_ok = co < out_channels
    acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    offsets = (b * out_channels + co[:, None]) * out_len + cols[None, :]
    mask = co_ok[:, None] & (cols < out_len)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1d_valid_kernel(
    x_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr,  # x [B, Cin, L]; [Cout, Cin, K]; [Cout]; 2 x [B, Cout, L_out]
    in_channels, in_len, out_channels, out_len, dilation, input_slope,
    KERNEL: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = tl.program_id(2)
    reduction = in_channels * KERNEL
    acc = tl.zeros([BLOCK_CO, BLOCK_T], tl.float32)
    for r0 in range(0, reduction, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < reduction
        w = tl.load(weight_ptr + co[:, None] * reduction + r[None, :],
                    mask=(co < out_channels)[:, None] & r_ok[None, :], other=0.0)
        ci, k = r // KERNEL, r % KERNEL
        x = tl.load(x_ptr + (b * in_channels + ci[:, None]) * in_len + k[:, None] * dilation + t[None, :],
                    mask=r_ok[:, None] & (t < out_len)[None, :], other=0.0)
        acc = _accumulate(acc, w, x, input_slope, USE_DOT, DOT_PRECISION)
    _finish(acc, bias_ptr, residual_ptr, out_ptr, b, co, t, out_channels, out_len, HAS_RESIDUAL)


@triton.jit
def _conv_transpose1d_window_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr,  # x [B, Cin, L]; weight [Cin, Cout, K]; bias [Cout]; out [B, Cout, count]
    in_channels, in_len, out_channels, start, count, input_slope,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, TAPS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    phase = tl.program_id(0) % STRIDE  # neighbouring programs: the phases of the same inputs
    first_q = (start - phase + STRIDE - 1) // STRIDE  # the first q whose phase output is >= start
    q = first_q + (tl.program_id(0) // STRIDE) * BLOCK_T + tl.arange(0, BLOCK_T)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = tl.program_id(2)
    reduction = in_channels * TAPS
    acc = tl.zeros([BLOCK_CO, BLOCK_T], tl.float32)
    for r0 in range(0, reduction, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ci, m = r // TAPS, r % TAPS
        k = phase + m * STRIDE
        w = tl.load(weight_ptr + (ci[None, :] * out_channels + co[:, None]) * KERNEL + k[None, :],
                    mask=(co < out_channels)[:, None] & ((r < reduction) & (k < KERNEL))[None, :], other=0.0)
        i = q[None, :] - m[:, None]  # [BLOCK_R, BLOCK_T] input steps
        x = tl.load(x_ptr + (b * in_channels + ci[:, None]) * in_len + i,
                    mask=(r < reduction)[:, None] & (i >= 0) & (i < in_len), other=0.0)
        acc = _accumulate(acc, w, x, input_slope, USE_DOT, DOT_PRECISION)
    window_steps = q * STRIDE + phase - start  # [BLOCK_T], >= 0 by the choice of first_q
    _finish(acc, bias_ptr, bias_ptr, out_ptr, b, co, window_steps, out_channels, count, False)  # no residual


def _target_programs(device: torch.device) -> int:
    """Two programs per SM on a GPU; in the CPU interpreter, as few programs as the tiles allow."""
    sms = sm_count(device)
    return 1 if sms is None else 2 * sms


@dataclass(frozen=True)
class _Tiles:
    block_co: int
    block_t: int
    block_r: int
    use_dot: bool
    precision: str

    def constexprs(self) -> dict:
        return dict(USE_DOT=self.use_dot, DOT_PRECISION=self.precision, BLOCK_CO=self.block_co,
                    BLOCK_T=self.block_t, BLOCK_R=self.block_r, num_warps=4, num_stages=2)


def _tiles(x: torch.Tensor, out_channels: int, columns: int, phases: int = 1) -> _Tiles:
    """Tile sizes for `phases` x `columns` output steps of `out_channels` channels per batch row."""
    limits = GPU_TILES if x.is_cuda else INTERPRETER_TILES
    use_dot = out_channels >= DOT_MIN
    block_co = min(limits.block_co, triton.next_power_of_2(out_channels))
    block_t = min(limits.block_t, max(DOT_MIN, triton.next_power_of_2(columns)))

    def programs():
        return x.shape[0] * phases * triton.cdiv(out_channels, block_co) * triton.cdiv(columns, block_t)

    target = _target_programs(x.device)
    while programs() < target and block_t > 2 * DOT_MIN:
        block_t //= 2
    while programs() < target and block_co > DOT_MIN:
        block_co //= 2
    if use_dot:
        block_r = limits.block_r // 2 if x.dtype == torch.float32 else limits.block_r
    else:
        block_r = max(1, min(limits.block_r, limits.broadcast // (block_co * block_t)))
    return _Tiles(block_co, block_t, block_r, use_dot, dot_precision(x.dtype))


def dot_precision(dtype: torch.dtype) -> str:
    """fp16/bf16 go to the tensor cores as they are; fp32 as TF32 only where torch allows it."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, in_channels: int, out_channels: int):
    """The weight's channel counts (in its own layout) must fit x and the bias."""
    assert x.dim() == 3 and weight.dim() == 3, f"x {list(x.shape)} and weight {list(weight.shape)} must be 3-D"
    assert x.shape[1] == in_channels, f"x has {x.shape[1]} channels, the weight {in_channels}"
    assert bias.shape == (out_channels,), f"bias {list(bias.shape)} must be [{out_channels}]"
    assert weight.dtype == x.dtype, f"weight {weight.dtype} must match x {x.dtype}"
    assert x.numel() < 2 ** 31, "the kernels index x with int32 offsets"


def conv1d_valid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int,
                 input_slope: float = 1.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, Cin, L], weight [Cout, Cin, K], bias [Cout], residual [B, Cout, L_out] or None
    -> [B, Cout, L_out], L_out = L - (K - 1) * dilation."""
    out_channels, in_channels, kernel = weight.shape
    _check_operands(x, weight, bias, in_channels, out_channels)
    batch, _, in_len = x.shape
    out_len = in_len - (kernel - 1) * dilation
    assert out_len >= 0, f"{in_len} steps are fewer than the receptive field {(kernel - 1) * dilation + 1}"
    out = torch.empty(batch, out_channels, out_len, device=x.device, dtype=x.dtype)
    assert out.numel() < 2 ** 31, "the kernels index the output with int32 offsets"
    if out.numel() == 0:
        return out
    if residual is not None:
        assert residual.shape == out.shape, f"residual {list(residual.shape)} must be {list(out.shape)}"
        residual = residual.contiguous()
    tiles = _tiles(x, out_channels, out_len)
    grid = (triton.cdiv(out_len, tiles.block_t), triton.cdiv(out_channels, tiles.block_co), batch)
    _conv1d_valid_kernel[grid](
        x.contiguous(), weight.contiguous(), bias.contiguous(), out if residual is None else residual, out,
        in_channels, in_len, out_channels, out_len, dilation, float(input_slope),
        KERNEL=kernel, HAS_RESIDUAL=residual is not None, **tiles.constexprs())
    return out


def conv_transpose1d_window(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int,
                            start: int, count: int, input_slope: float = 1.0) -> torch.Tensor:
    """x [B, Cin, L], weight [Cin, Cout, K], bias [Cout] -> [B, Cout, count]: outputs start ..
    start + count - 1 of the unpadded transposed conv, whose length is (L - 1) * stride + K."""
    in_channels, out_channels, kernel = weight.shape
    _check_operands(x, weight, bias, in_channels, out_channels)
    batch, _, in_len = x.shape
    full_length = (in_len - 1) * stride + kernel
    assert 0 <= start and 0 <= count and start + count <= full_length, \
        f"window {start}+{count} outside 0..{full_length}"
    out = torch.empty(batch, out_channels, count, device=x.device, dtype=x.dtype)
    assert out.numel() < 2 ** 31, "the kernels index the output with int32 offsets"
    if out.numel() == 0:
        return out
    per_phase = triton.cdiv(count, stride)  # the most outputs any phase has in the window
    tiles = _tiles(x, out_channels, per_phase, phases=stride)
    grid = (stride * triton.cdiv(per_phase, tiles.block_t), triton.cdiv(out_channels, tiles.block_co), batch)
    _conv_transpose1d_window_kernel[grid](
        x.contiguous(), weight.contiguous(), bias.contiguous(), out,
        in_channels, in_len, out_channels, start, count, float(input_slope),
        KERNEL=kernel, STRIDE=stride, TAPS=triton.cdiv(kernel, stride), **tiles.constexprs())
    return out
