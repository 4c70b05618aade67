"""The online-softmax step that both attention kernels (decode and prefill) run per key tile."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(q, k, v, visible, run_max, run_sum, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running (max, sum, output) of each query row.

    q [M, D], k and v [N, D], visible [M, N] (or [1, N]) -> the updated run_max [M], run_sum [M],
    acc [M, D], all fp32. Scores are in log2 units (scale * log2(e) folded into scale_log2) so the
    softmax uses exp2; an invisible key scores -inf and adds nothing."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(scores, axis=1))
    rescale = tl.exp2(run_max - new_max)
    p = tl.exp2(scores - new_max[:, None])
    run_sum = run_sum * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, run_sum, acc
