"""Next-token selection: greedy, or temperature + top-p (+ top-k) sampling by Gumbel-max.

Sampling adds Gumbel noise to the tempered logits of the allowed rows and takes the argmax,
which draws exactly from the softmax over those rows. The noise comes from a counter-based
hash of (seed, step, batch row, column), not from a stateful generator, so that:
- the torch reference and the Triton/CUDA kernels draw the *same* token for the same inputs;
- the step counter can live on the GPU and be bumped in place (no host sync, graph-capturable).
The counter is one for the whole batch (a [] or [1] tensor: row b is hashed as row b), or one per
row (a [B] tensor: every row is hashed as row 0). The second lets the rows of independent
conversations share one pass over the output head and still draw what each would draw alone.

Top-p keeps column i when the probability mass of the columns strictly more likely than i is
below top_p (the most likely column is always kept); top-k keeps the k most likely. Ties in
the argmax go to the lowest column, as `torch.argmax` does.
"""

import math
import struct
from dataclasses import dataclass

import torch

from . import backend
from .errors import EchoXError

_MASK32 = 0xFFFFFFFF


def as_float32(value: float) -> float:
    """`value` rounded to float32 (values below its smallest subnormal, about 1.4e-45, become 0)."""
    return struct.unpack("f", struct.pack("f", value))[0]


# Logits are divided by T in fp32 (the kernels multiply by fp32(1 / T) on the GPU): at a T below
# |logit| / 3.4e38 that overflows to inf, the softmax of top-p becomes NaN and every row picked
# column 0. From 1e-30 on, only a logit above 3.4e8 could overflow (an LLM's are tens), and every
# temperature that sampled before still does; 0 says greedy, exactly.
MIN_TEMPERATURE = 1e-30


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k limit
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise EchoXError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                             f"got {self.temperature}")
        if not (0 < self.top_p <= 1 and as_float32(self.top_p) > 0):  # the selection runs in fp32
            raise EchoXError(f"top-p must be in (0, 1] and not 0 in float32, got {self.top_p}")
        if self.top_k < 0:
            raise EchoXError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


RELEASED_SAMPLING = SamplingParams(temperature=0.2, top_p=0.9)  # SPEC §6
GREEDY = SamplingParams()


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: int, step: torch.Tensor, rows: int, cols: int, device=None) -> torch.Tensor:
    """[rows, cols] fp32 uniforms in (0, 1), a pure function of (seed, step, row, col).

    step is an int64 tensor on the device (so a graph can replay it): [] or [1], one counter for
    all rows, or [rows], a counter per row, each row then hashed as row 0.
    """
    row, step = noise_counters(step, rows, device)
    col = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    key = (col * 0x9E3779B1 + row * 0x85EBCA77 + step * 0xC2B2AE3D
           + (seed & _MASK32) * 0x27D4EB2F) & _MASK32  # kernels use the seed's low 32 bits
    # 23 random bits: (k + 0.5) / 2^23 is exact in fp32 and at most 1 - 2^-24. With 24 bits the
    # largest draw rounded to 1.0, whose Gumbel noise is +inf: a column chosen whatever its logit.
    bits = _fmix32(key) >> 9
    return (bits.float() + 0.5) * (1.0 / (1 << 23))


def noise_counters(step: torch.Tensor, rows: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The row index and step counter each row's noise is hashed with, both [rows, 1] or broadcastable."""
    if step.numel() == 1:
        return torch.arange(rows, device=device, dtype=torch.int64)[:, None], step.reshape(1, 1)
    if step.shape != (rows,):
        raise EchoXError(f"the sampling counter must have 1 or {rows} entries (one per row), got {tuple(step.shape)}")
    return torch.zeros(rows, 1, device=device, dtype=torch.int64), step.reshape(rows, 1)


def gumbel_noise(seed: int, step: torch.Tensor, rows: int, cols: int, device=None) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seed, step, rows, cols, device)))


def allowed_columns(scaled: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """[B, R] bool: the top-k / top-p set of each row of tempered logits."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        keep &= scaled >= kth
    if top_p < 1:
        probs = scaled.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead in the order
        # Equal probabilities share the mass of the first of them, so ties are kept together.
        sorted_keep = mass_before < top_p
        sorted_keep |= sorted_probs >= sorted_probs.masked_fill(~sorted_keep, float("inf")).amin(-1, keepdim=True)
        keep &= torch.zeros_like(keep).scatter(-1, order, sorted_keep)
    return keep


def select_reference(logits: torch.Tensor, params: SamplingParams, step: torch.Tensor) -> torch.Tensor:
    """logits [B, R] -> chosen column [B] (int64). The definition the kernels are tested against."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits / params.temperature
    keep = allowed_columns(scaled, params.top_p, params.top_k)
    noise = gumbel_noise(params.seed, step, *scaled.shape, device=scaled.device)
    return (scaled + noise).masked_fill(~keep, float("-inf")).argmax(dim=-1)


def head_select(hidden: torch.Tensor, weight: torch.Tensor, params: SamplingParams, step: torch.Tensor,
                backend_name: str | None = None) -> torch.Tensor:
    """Project hidden [B, h] on head rows weight [R, h] and select a row [B], without a host sync.

    step: the sampling counter, [] or [1] for the batch or [B] per row (see uniform_noise).

    The fused kernels never materialise the [B, R] logits; the torch path does, in fp32.
    """
    which = backend.choose("head_select", hidden, backend_name)
    if which == "triton":
        from echox_kernels.head_select import head_select as kernel
        return kernel(hidden, weight, params, step)
    if which == "cuda":
        import echox_cuda
        return echox_cuda.head_select(hidden, weight, params.temperature, params.top_p, params.top_k,
                                      params.seed, step)
    return select_reference(head_logits(hidden, weight), params, step)


HEAD_ROWS = 4096  # rows of a 16-bit head converted to fp32 at a time by `head_logits`


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [B, h] @ weight [R, h].T -> [B, R] fp32 logits. A 16-bit head is converted a slice of rows
    at a time: a whole fp32 copy of it would be 2 GB at EchoX-8B's vocabulary, made for every token."""
    hidden = hidden.float()
    if weight.dtype == torch.float32:
        return hidden @ weight.T
    return torch.cat([hidden @ rows.float().T for rows in weight.split(HEAD_ROWS)], dim=-1)
