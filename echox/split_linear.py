"""One-row products split over CPU cores, with F.linear's bits.

A decode step multiplies one row by every weight matrix, and once the weights outgrow the
caches it is bound by how fast memory is read. MKL runs a one-row F.linear on one core however
many torch threads the caller has, and one core reads memory more slowly than two (on the 2-core
CI machine ~12 vs ~20 GB/s: `python bench/cpu_roofline.py`). So a layer here multiplies the row
by the two halves of its weight's rows as a batch of two (`torch.bmm`, which shares a batch out
over the caller's threads). Each output is its own dot product, and MKL sums it in the same
order whatever the number of outputs, as long as the halves keep its blocks of outputs whole; so
the bits are F.linear's. That is checked on this machine for each weight shape before its layers
split (`split_one_row_products`); a shape that fails keeps F.linear. With one torch thread the
batch runs on one core as fast as F.linear does: the split pays off only for a caller with
more threads (the echo decoder while the vocoder waits for units, speech_pipeline.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

PARTS = 2
OUTPUT_BLOCK = 64  # each part's outputs a multiple of this: whole blocks of any width MKL uses


def split_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] holding one row, weight [out, in] -> x @ weight.T [..., out], as PARTS products."""
    out_features, in_features = weight.shape
    rows = x.reshape(1, 1, in_features).expand(PARTS, 1, in_features)
    parts = weight.view(PARTS, out_features // PARTS, in_features).transpose(1, 2)
    return torch.bmm(rows, parts).reshape(*x.shape[:-1], out_features)


class SplitLinear(nn.Linear):
    """A bias-free nn.Linear whose one-row products are `split_product`; longer inputs (a prefill,
    a batched step) go to F.linear as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return F.linear(x, self.weight)
        return split_product(x, self.weight)


def splits_exactly(weight: torch.Tensor, probes: int = 2) -> bool:
    """Whether `split_product` gives F.linear's bits for a weight of this shape, here: tried with
    this weight on random rows (a different order of sums shows in the last bits of some output;
    the order depends on the shape, not the values, so one weight speaks for its shape)."""
    out_features, in_features = weight.shape
    if weight.device.type != "cpu" or out_features % (PARTS * OUTPUT_BLOCK):
        return False
    generator = torch.Generator().manual_seed(0)
    for _ in range(probes):
        x = torch.randn(1, 1, in_features, generator=generator, dtype=weight.dtype)
        if not torch.equal(F.linear(x, weight), split_product(x, weight)):
            return False
    return True


def split_one_row_products(module: nn.Module) -> int:
    """Turn every bias-free nn.Linear in `module` whose shape splits exactly into a SplitLinear
    (same weight tensor, same parameter names); returns how many were turned."""
    verdicts: dict[tuple, bool] = {}
    turned = 0
    for layer in module.modules():
        if type(layer) is not nn.Linear or layer.bias is not None:
            continue
        shape = (*layer.weight.shape, layer.weight.dtype)
        if shape not in verdicts:
            verdicts[shape] = splits_exactly(layer.weight)
        if verdicts[shape]:
            layer.__class__ = SplitLinear  # a subclass with no state of its own: only forward changes
            turned += 1
    return turned
