"""Fused output head + token selection in Triton: the head weight is read once per token.

Contract: exactly `echox.sampling.head_select` / `select_reference` on hidden @ weight.T:
greedy argmax (ties to the lowest row), or Gumbel-max sampling of logits / T restricted to the
top-k and top-p sets, with the noise of `echox.sampling.uniform_noise` (same counter hash), so
the kernel draws the same row as the torch reference. No host sync: every decision lives on
the device, and the launch sequence depends only on shapes and the (host) SamplingParams.

One GEMV pass streams the weight and computes the fp32 logits / T tile by tile (a program takes
up to 4 sequences; more sequences run as more batch tiles over the same rows, which then come
from L2); each program reduces its tiles into small partials [B, P, ...] that a combine kernel
(grid B) merges:
- greedy and plain sampling: the argmax of logits / T (+ Gumbel noise) is folded into the GEMV;
- with top-k / top-p the GEMV also writes the tempered logits [B, R] (0.5 MB per row at the
  Llama-3 vocabulary, against 1 GB of weight) and its stats (max logit and the range of order
  keys: fp32 bits mapped to order-preserving int32), and the search below reads those:
  1. top-k, then top-p: a cutoff key c such that the kept set is {columns with key >= c}.
     Both sets have the form "column i is kept iff W(columns with key > key_i) < bound" with
     W = count, bound = k (top-k), or W = softmax mass, bound = top_p (top-p). W(key > x) falls
     as x grows, so the cutoff is the smallest column key where it drops below the bound. A
     pass splits the bracket (lo, hi] (W(lo) >= bound > W(hi), hi a column key) at NT
     candidate keys and keeps the sub-bracket where W crosses the bound: 64 candidates per pass
     narrow 2^32 keys to one in 6 passes. A row is done early when no column key lies strictly
     inside its bracket; once all rows are, later passes return at once.
  2. final: argmax of logits / T + Gumbel noise over columns with key >= cutoff.
Ties in probability share their key, so they are kept or dropped together, as in the reference.

Rounding follows the reference on the device the kernel runs on: torch's CUDA `logits / T`
multiplies by the fp32 reciprocal of T, its CPU one divides. So on a GPU the kernel multiplies
with one rounding (an fma with a zero addend, which the compiler cannot fuse with the noise
addition that follows), and in the interpreter it divides (`div_rn`, never the approximate
`div.full`).
"""

import math

import numpy as np
import torch
import triton
import triton.language as tl

from echox.sampling import SamplingParams

MAX_BLOCK_R = 64  # head rows per GEMV tile; fewer when the head is too small to fill the GPU
MAX_BLOCK_B = 4  # sequences per program: a [B, R, K] partial-sum tile stays in registers
INTERPRETER_MAX_BLOCK_B = 64  # the interpreter pays per program, not per register: few, large tiles
CANDIDATES = 64  # cutoff candidates tested per pass
SEARCH_PASSES = math.ceil(32 / math.log2(CANDIDATES))  # enough to pin one of 2^32 keys
TARGET_PROGRAMS = 512  # programs per pass: about 4 per H100 SM
MIN_PROGRAMS = 256  # about two per H100 SM: a smaller head gets smaller tiles (the 8k-row unit head)
_KEY_FLOOR = -(2 ** 31)  # below every order key: "keep all"
_BELOW_ALL = tl.constexpr(-(2 ** 40))  # sentinels outside the int32 key range, for min/max
_ABOVE_ALL = tl.constexpr(2 ** 40)
_MASK32 = 0xFFFFFFFF


@triton.jit
def _tempered_logits(hidden_ptr, weight_ptr, b, rows, batch, num_rows, hidden_size, stride_hb, stride_wr,
                     temperature_term, RECIPROCAL: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_B, BLOCK_R] fp32 logits / T of sequences `b` and head rows `rows`, FMA sums (no tf32).

    The products accumulate in a [BLOCK_B, BLOCK_R, BLOCK_K] tile, each thread on its own
    elements, and are summed over K once after the loop: a reduction inside the loop would cost
    warp shuffles and barriers for every BLOCK_K columns of weight and cap the bandwidth."""
    acc = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_K], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(hidden_ptr + b[:, None, None] * stride_hb + k[None, None, :],
                    mask=(b[:, None, None] < batch) & (k[None, None, :] < hidden_size), other=0.0)
        w = tl.load(weight_ptr + rows[None, :, None] * stride_wr + k[None, None, :],
                    mask=(rows[None, :, None] < num_rows) & (k[None, None, :] < hidden_size), other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)  # [BLOCK_B, 1, K] * [1, BLOCK_R, K]
    logits = tl.sum(acc, axis=2)
    if RECIPROCAL:  # temperature_term = fp32(1 / T): one rounding, as torch's CUDA division by a scalar
        return tl.math.fma(logits, temperature_term, 0.0)
    return tl.math.div_rn(logits, temperature_term)  # temperature_term = T, as torch's CPU division


@triton.jit
def _order_key(x):
    """fp32 -> int64 holding an int32 with the same order (-0.0 first folded into +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _gumbel(cols, batch_rows, step, seed_term):
    """Gumbel noise of echox.sampling.gumbel_noise: murmur3 fmix32 of a uint32 counter, 23 bits."""
    key = (cols.to(tl.uint32) * tl.full([], 0x9E3779B1, tl.uint32)
           + batch_rows.to(tl.uint32) * tl.full([], 0x85EBCA77, tl.uint32)
           # A launch turns an int argument equal to 1 into a constant, which has no .to(): tl.full takes both.
           + step.to(tl.uint32) * tl.full([], 0xC2B2AE3D, tl.uint32) + tl.full([], seed_term, tl.int64).to(tl.uint32))
    key = key ^ (key >> 16)
    key = key * tl.full([], 0x85EBCA6B, tl.uint32)
    key = key ^ (key >> 13)
    key = key * tl.full([], 0xC2B2AE35, tl.uint32)
    key = key ^ (key >> 16)
    uniform = ((key >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(-tl.log(uniform))


@triton.jit
def _noise_counters(step_ptr, b, live_row, PER_ROW_STEP: tl.constexpr):
    """[BLOCK_B] x2: the step counter of each sequence and the row its noise is hashed as, as
    echox.sampling.noise_counters: one counter for the batch (rows hashed by index) or one per
    sequence (each hashed as row 0)."""
    if PER_ROW_STEP:
        return tl.load(step_ptr + b, mask=live_row, other=0), b * 0
    else:
        return tl.load(step_ptr + b * 0), b


@triton.jit
def _fold_best(best, best_index, scaled, kept, tile, rows, hashed_rows, step, seed_term, SAMPLE: tl.constexpr):
    """Fold one tile into the running best (logits / T [+ Gumbel]) per sequence; lowest row on ties."""
    if SAMPLE:
        scaled += _gumbel(rows[None, :], hashed_rows[:, None], step[:, None], seed_term)
    value = tl.where(kept, scaled, float("-inf"))
    tile_best = tl.max(value, axis=1)
    tile_index = tile + tl.argmax(value, axis=1, tie_break_left=True)
    better = tile_best > best  # strict: an earlier tile (lower index) wins ties
    return tl.where(better, tile_best, best), tl.where(better, tile_index, best_index)


@triton.jit
def _gemv_kernel(hidden_ptr, weight_ptr, step_ptr, scaled_ptr,  # scaled [B, R] fp32 (STORE only)
                 part_a_ptr, part_b_ptr, part_c_ptr,  # [B, P]: (best, index) or, with STORE, (max, min key, max key)
                 batch, num_rows, hidden_size, stride_hb, stride_wr, rows_per_program, num_programs,
                 temperature_term, seed_term, RECIPROCAL: tl.constexpr, STORE: tl.constexpr, SAMPLE: tl.constexpr,
                 PER_ROW_STEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The one pass over the weight. Without STORE: per program, the best row (greedy or Gumbel-max).
    With STORE: the tempered logits to `scaled` and per program their max and order-key range."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # this program's tile of sequences
    program = tl.program_id(1)
    live_row = b < batch
    step, hashed_rows = _noise_counters(step_ptr, b, live_row, PER_ROW_STEP)
    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_B], tl.int32)
    worst = tl.full([BLOCK_B], float("inf"), tl.float32)
    first = program * rows_per_program
    for tile in range(first, tl.minimum(first + rows_per_program, num_rows), BLOCK_R):
        rows = tile + tl.arange(0, BLOCK_R)
        scaled = _tempered_logits(hidden_ptr, weight_ptr, b, rows, batch, num_rows, hidden_size, stride_hb, stride_wr,
                                  temperature_term, RECIPROCAL, BLOCK_B, BLOCK_R, BLOCK_K)
        in_range = (rows < num_rows)[None, :]
        if STORE:
            tl.store(scaled_ptr + b[:, None] * num_rows + rows[None, :], scaled, mask=live_row[:, None] & in_range)
            best = tl.maximum(best, tl.max(tl.where(in_range, scaled, float("-inf")), axis=1))
            worst = tl.minimum(worst, tl.min(tl.where(in_range, scaled, float("inf")), axis=1))
        else:
            best, best_index = _fold_best(best, best_index, scaled, in_range, tile, rows, hashed_rows, step,
                                          seed_term, SAMPLE)
    out = b * num_programs + program
    tl.store(part_a_ptr + out, best, mask=live_row)
    if STORE:
        tl.store(part_b_ptr + out, _order_key(worst), mask=live_row)
        tl.store(part_c_ptr + out, _order_key(best), mask=live_row)
    else:
        tl.store(part_b_ptr + out, best_index, mask=live_row)


@triton.jit
def _load_scaled(scaled_ptr, rows, b, batch, num_rows):
    """[BLOCK_B, BLOCK_R] tile of the stored tempered logits (-inf outside)."""
    return tl.load(scaled_ptr + b[:, None] * num_rows + rows[None, :],
                   mask=(b < batch)[:, None] & (rows < num_rows)[None, :], other=float("-inf"))


@triton.jit
def _cutoff_pass_kernel(scaled_ptr, bracket_ptr, done_ptr, floor_ptr, max_ptr,  # [B, R], [B, 2], [B], [B], [B]
                        part_weight_ptr, part_below_ptr, part_above_ptr, part_total_ptr,  # [B, P, NT] x3, [B, P]
                        batch, num_rows, rows_per_program, num_programs,
                        MASS: tl.constexpr, NT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per candidate key t_j of each row's bracket: W(key > t_j), max key <= t_j, min key > t_j."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # this program's tile of sequences
    program = tl.program_id(1)
    live_row = b < batch
    pending = tl.sum((tl.load(done_ptr + b, mask=live_row, other=1) == 0).to(tl.int32), axis=0)
    if pending > 0:  # all rows settled: nothing to do
        lo = tl.load(bracket_ptr + 2 * b, mask=live_row, other=0)
        hi = tl.load(bracket_ptr + 2 * b + 1, mask=live_row, other=0)
        floor = tl.load(floor_ptr + b, mask=live_row, other=0)  # keys below it are out (the top-k cut)
        row_max = tl.load(max_ptr + b, mask=live_row, other=0.0)
        j = tl.arange(0, NT)
        cand = lo[:, None] + ((hi - lo)[:, None] * j[None, :]) // NT  # [BLOCK_B, NT], cand[:, 0] = lo
        weight_above = tl.zeros([BLOCK_B, NT], tl.float32)
        below = tl.full([BLOCK_B, NT], _BELOW_ALL, tl.int64)
        above = tl.full([BLOCK_B, NT], _ABOVE_ALL, tl.int64)
        total = tl.zeros([BLOCK_B], tl.float32)
        first = program * rows_per_program
        for tile in range(first, tl.minimum(first + rows_per_program, num_rows), BLOCK_R):
            rows = tile + tl.arange(0, BLOCK_R)
            scaled = _load_scaled(scaled_ptr, rows, b, batch, num_rows)
            keys = _order_key(scaled)  # [BLOCK_B, BLOCK_R]
            eligible = (rows < num_rows)[None, :] & live_row[:, None] & (keys >= floor[:, None])
            if MASS:
                w = tl.where(eligible, tl.exp(scaled - row_max[:, None]), 0.0)
            else:
                w = eligible.to(tl.float32)
            is_above = keys[:, :, None] > cand[:, None, :]  # [BLOCK_B, BLOCK_R, NT]
            weight_above += tl.sum(tl.where(is_above, w[:, :, None], 0.0), axis=1)
            keys3 = keys[:, :, None] + tl.zeros([BLOCK_B, BLOCK_R, NT], tl.int64)
            eligible3 = eligible[:, :, None]
            below = tl.maximum(below, tl.max(tl.where(eligible3 & ~is_above, keys3, _BELOW_ALL), axis=1))
            above = tl.minimum(above, tl.min(tl.where(eligible3 & is_above, keys3, _ABOVE_ALL), axis=1))
            total += tl.sum(w, axis=1)
        out = (b[:, None] * num_programs + program) * NT + j[None, :]
        tl.store(part_weight_ptr + out, weight_above, mask=live_row[:, None])
        tl.store(part_below_ptr + out, below, mask=live_row[:, None])
        tl.store(part_above_ptr + out, above, mask=live_row[:, None])
        tl.store(part_total_ptr + b * num_programs + program, total, mask=live_row)
@triton.jit
def _cutoff_combine_kernel(bracket_ptr, done_ptr, part_weight_ptr, part_below_ptr, part_above_ptr, part_total_ptr,
                           num_programs, bound, MASS: tl.constexpr, NT: tl.constexpr, BLOCK_P: tl.constexpr):
    """Row b: merge the programs and narrow the bracket to the sub-bracket where W crosses the bound."""
    b = tl.program_id(0)
    if tl.load(done_ptr + b) == 0:
        j = tl.arange(0, NT)
        weight_above = tl.zeros([NT], tl.float32)
        below = tl.full([NT], _BELOW_ALL, tl.int64)
        above = tl.full([NT], _ABOVE_ALL, tl.int64)
        total = tl.zeros([BLOCK_P], tl.float32)
        for p0 in range(0, num_programs, BLOCK_P):  # fixed order: the sums are deterministic
            p = p0 + tl.arange(0, BLOCK_P)
            at = (b * num_programs + p)[:, None] * NT + j[None, :]
            live = (p < num_programs)[:, None]
            weight_above += tl.sum(tl.load(part_weight_ptr + at, mask=live, other=0.0), axis=0)
            below = tl.maximum(below, tl.max(tl.load(part_below_ptr + at, mask=live, other=_BELOW_ALL), axis=0))
            above = tl.minimum(above, tl.min(tl.load(part_above_ptr + at, mask=live, other=_ABOVE_ALL), axis=0))
            total += tl.load(part_total_ptr + b * num_programs + p, mask=p < num_programs, other=0.0)
        if MASS:
            bound = bound * tl.sum(total, axis=0)  # top_p of the softmax mass over the eligible columns
        lo = tl.load(bracket_ptr + 2 * b)
        hi = tl.load(bracket_ptr + 2 * b + 1)
        cand = lo + ((hi - lo) * j) // NT
        # W(cand_0 = lo) >= bound by the invariant, and W falls with j: the last j still >= bound.
        crossing = tl.max(tl.where(weight_above >= bound, j, -1), axis=0)
        new_lo = tl.max(tl.where(j == crossing, cand, _BELOW_ALL), axis=0)
        # The next candidate has W < bound; its largest column key has the same W and becomes hi.
        new_hi = tl.max(tl.where(j == crossing + 1, below, _BELOW_ALL), axis=0)
        new_hi = tl.where(crossing + 1 < NT, new_hi, hi)
        first_key_above_lo = tl.min(tl.where(j == crossing, above, _ABOVE_ALL), axis=0)
        tl.store(bracket_ptr + 2 * b, new_lo)
        tl.store(bracket_ptr + 2 * b + 1, new_hi)
        tl.store(done_ptr + b, (first_key_above_lo == new_hi).to(tl.int32))


@triton.jit
def _argmax_kernel(scaled_ptr, cutoff_ptr, step_ptr, part_value_ptr, part_index_ptr,  # [B, R], [B], [], [B, P] x2
                   batch, num_rows, rows_per_program, num_programs, seed_term,
                   PER_ROW_STEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per program: best stored logits / T + Gumbel over columns with key >= cutoff, lowest index on ties."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # this program's tile of sequences
    program = tl.program_id(1)
    live_row = b < batch
    cutoff = tl.load(cutoff_ptr + b, mask=live_row, other=0)
    step, hashed_rows = _noise_counters(step_ptr, b, live_row, PER_ROW_STEP)
    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_B], tl.int32)
    first = program * rows_per_program
    for tile in range(first, tl.minimum(first + rows_per_program, num_rows), BLOCK_R):
        rows = tile + tl.arange(0, BLOCK_R)
        scaled = _load_scaled(scaled_ptr, rows, b, batch, num_rows)
        kept = (rows < num_rows)[None, :] & (_order_key(scaled) >= cutoff[:, None])
        best, best_index = _fold_best(best, best_index, scaled, kept, tile, rows, hashed_rows, step, seed_term,
                                      True)
    tl.store(part_value_ptr + b * num_programs + program, best, mask=live_row)
    tl.store(part_index_ptr + b * num_programs + program, best_index, mask=live_row)


@triton.jit
def _argmax_combine_kernel(part_value_ptr, part_index_ptr, out_ptr, num_programs, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    best = tl.full([], float("-inf"), tl.float32)
    best_index = tl.full([], 0, tl.int32)
    for p0 in range(0, num_programs, BLOCK_P):  # programs hold increasing rows: strict > keeps the lowest
        p = p0 + tl.arange(0, BLOCK_P)
        value = tl.load(part_value_ptr + b * num_programs + p, mask=p < num_programs, other=float("-inf"))
        index = tl.load(part_index_ptr + b * num_programs + p, mask=p < num_programs, other=0)
        chunk_best = tl.max(value, axis=0)
        chunk_index = tl.min(tl.where(value == chunk_best, index, 2 ** 31 - 1), axis=0)
        better = chunk_best > best
        best_index = tl.where(better, chunk_index, best_index)
        best = tl.maximum(best, chunk_best)
    tl.store(out_ptr + b, best_index.to(tl.int64))


def _temperature_term(temperature: float, reciprocal: bool) -> float:
    """What the kernel scales by: T as torch rounds a Python float to fp32, or that fp32's
    reciprocal rounded to fp32 (torch's CUDA `tensor / scalar` computes exactly that)."""
    t = np.float32(temperature)
    return float(np.float32(1.0) / t) if reciprocal else float(t)


class _Launch:
    """Shapes and tiling shared by every pass of one head_select call.

    `reciprocal` says how logits / T is rounded: as torch does on a GPU (True) or on the CPU."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float, reciprocal: bool):
        self.hidden, self.weight = hidden, weight
        self.reciprocal = reciprocal
        self.temperature_term = _temperature_term(temperature, reciprocal)
        self.batch, self.hidden_size = hidden.shape
        self.num_rows = weight.shape[0]
        max_block_b = MAX_BLOCK_B if hidden.is_cuda else INTERPRETER_MAX_BLOCK_B
        self.block_b = min(max_block_b, triton.next_power_of_2(self.batch))
        self.batch_tiles = triton.cdiv(self.batch, self.block_b)
        self.block_k = max(16, min(128, triton.next_power_of_2(self.hidden_size)) // self.block_b)
        self.block_r = MAX_BLOCK_R
        while self.block_r > 16 and triton.cdiv(self.num_rows, self.block_r) < MIN_PROGRAMS:
            self.block_r //= 2
        tiles = triton.cdiv(self.num_rows, self.block_r)
        self.rows_per_program = triton.cdiv(tiles, TARGET_PROGRAMS) * self.block_r
        self.programs = triton.cdiv(self.num_rows, self.rows_per_program)
        self.block_p = min(64, triton.next_power_of_2(self.programs))

    def gemv(self, step: torch.Tensor, seed_term: int, scaled, part_a, part_b, part_c, store: bool, sample: bool):
        _gemv_kernel[self.grid()](
            self.hidden, self.weight, step, scaled, part_a, part_b, part_c,
            self.batch, self.num_rows, self.hidden_size, self.hidden.stride(0), self.weight.stride(0),
            self.rows_per_program, self.programs, self.temperature_term, seed_term,
            RECIPROCAL=self.reciprocal, STORE=store, SAMPLE=sample, PER_ROW_STEP=per_row_step(step),
            BLOCK_B=self.block_b, BLOCK_R=self.block_r, BLOCK_K=self.block_k, num_warps=4)

    def grid(self) -> tuple[int, int]:
        """Batch tiles along the fastest grid axis: the tiles that read the same head rows run side
        by side, so the weight comes from DRAM once and from L2 for the other tiles."""
        return (self.batch_tiles, self.programs)

    def logits_args(self):
        return (self.batch, self.num_rows, self.rows_per_program, self.programs)

    def partials(self, *tail, dtype=torch.float32):
        return torch.empty(self.batch, self.programs, *tail, device=self.hidden.device, dtype=dtype)


def _search_cutoff(run: _Launch, scaled: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, floor: torch.Tensor,
                   row_max: torch.Tensor, bound: float, mass: bool) -> torch.Tensor:
    """Smallest column key where W(key > it) < bound (the bracket (lo, hi] holds it). [B] int64."""
    bracket = torch.stack([lo, hi], dim=1).contiguous()  # [B, 2]
    done = torch.zeros(run.batch, device=lo.device, dtype=torch.int32)
    part_weight = run.partials(CANDIDATES)
    part_below = run.partials(CANDIDATES, dtype=torch.int64)
    part_above = run.partials(CANDIDATES, dtype=torch.int64)
    part_total = run.partials()
    for _ in range(SEARCH_PASSES):  # a fixed count: settled passes return at once, nothing waits on the host
        _cutoff_pass_kernel[run.grid()](
            scaled, bracket, done, floor, row_max, part_weight, part_below, part_above, part_total,
            *run.logits_args(), MASS=mass, NT=CANDIDATES, BLOCK_B=run.block_b, BLOCK_R=run.block_r, num_warps=4)
        _cutoff_combine_kernel[(run.batch,)](
            bracket, done, part_weight, part_below, part_above, part_total, run.programs, float(bound),
            MASS=mass, NT=CANDIDATES, BLOCK_P=run.block_p, num_warps=4)
    return bracket[:, 1].contiguous()  # the kernels index it as a plain [B] array


def _keep_cutoff(run: _Launch, params: SamplingParams, scaled: torch.Tensor, row_max: torch.Tensor,
                 min_key: torch.Tensor, max_key: torch.Tensor) -> torch.Tensor:
    """[B] int64 order key: the top-k/top-p set is {columns with key >= cutoff} of the stored logits."""
    cutoff = torch.full((run.batch,), _KEY_FLOOR, device=scaled.device, dtype=torch.int64)
    if _uses_top_k(params, run.num_rows):
        cutoff = _search_cutoff(run, scaled, min_key - 1, max_key, cutoff, row_max, params.top_k, mass=False)
    if params.top_p < 1:
        cutoff = _search_cutoff(run, scaled, torch.maximum(min_key, cutoff) - 1, max_key, cutoff, row_max,
                                params.top_p, mass=True)
    return cutoff


def per_row_step(step: torch.Tensor) -> bool:
    """A counter per sequence ([B]) rather than one for the batch ([] or [1])."""
    return step.numel() > 1


def _uses_top_k(params: SamplingParams, num_rows: int) -> bool:
    return 0 < params.top_k < num_rows


def filtered(params: SamplingParams, num_rows: int) -> bool:
    """Whether the call restricts sampling to a top-k / top-p set (and so stores the logits)."""
    return not params.greedy and (_uses_top_k(params, num_rows) or params.top_p < 1)


def tempered_logits_and_cutoff(run: _Launch, params: SamplingParams, step: torch.Tensor, seed_term: int):
    """The GEMV pass storing logits / T [B, R], then the cutoff search over them."""
    scaled = torch.empty(run.batch, run.num_rows, device=run.hidden.device, dtype=torch.float32)
    part_max = run.partials()
    part_min_key, part_max_key = run.partials(dtype=torch.int64), run.partials(dtype=torch.int64)
    run.gemv(step, seed_term, scaled, part_max, part_min_key, part_max_key, store=True, sample=False)
    cutoff = _keep_cutoff(run, params, scaled, part_max.amax(1), part_min_key.amin(1), part_max_key.amax(1))
    return scaled, cutoff


def head_select(hidden: torch.Tensor, weight: torch.Tensor, params: SamplingParams, step: torch.Tensor,
                reciprocal: bool | None = None) -> torch.Tensor:
    """hidden [B, h], weight [R, h], step int64 on the device -> selected row [B] int64.

    step: [] or [1], one counter for the batch, or [B], one per sequence (echox.sampling.uniform_noise).

    `reciprocal` (default: whether hidden is on a GPU) rounds logits / T as torch does there."""
    assert hidden.shape[1] == weight.shape[1], f"hidden size {hidden.shape[1]} != head width {weight.shape[1]}"
    assert hidden.stride(1) == weight.stride(1) == 1, "the hidden dim must be contiguous"
    assert step.numel() in (1, hidden.shape[0]) and step.is_contiguous(), "one step counter, or one per sequence"
    reciprocal = hidden.is_cuda if reciprocal is None else reciprocal
    run = _Launch(hidden, weight, 1.0 if params.greedy else params.temperature, reciprocal)
    seed_term = (params.seed * 0x27D4EB2F) & _MASK32
    part_value, part_index = run.partials(), run.partials(dtype=torch.int32)
    if filtered(params, run.num_rows):
        scaled, cutoff = tempered_logits_and_cutoff(run, params, step, seed_term)
        _argmax_kernel[run.grid()](scaled, cutoff, step, part_value, part_index, *run.logits_args(), seed_term,
                                   PER_ROW_STEP=per_row_step(step), BLOCK_B=run.block_b, BLOCK_R=run.block_r,
                                   num_warps=4)
    else:
        run.gemv(step, seed_term, part_value, part_value, part_index, part_index, store=False,
                 sample=not params.greedy)
    out = torch.empty(run.batch, device=hidden.device, dtype=torch.int64)
    _argmax_combine_kernel[(run.batch,)](part_value, part_index, out, run.programs, BLOCK_P=run.block_p)
    return out
