"""Length-bucketed batches, right padding, and each process's share of a global batch.

Examples of similar length are batched together so that little compute goes into padding: the
examples are sorted by length, cut into global batches, and the order of the batches (not their
contents) is shuffled per epoch from the seed. Every process of a torchrun job draws the same
global batches and takes its own contiguous slice, so the job trains on exactly the batches one
process would, and a restarted run can skip to any step.

Padding goes on the right and comes with a mask; every example keeps its own positions
0..n-1, and no example ever sees another's rows.
"""

import torch


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of example indices: similar lengths together, batch order shuffled per epoch."""
    by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        # A short last batch would give some processes nothing to do: fill it from the first.
        batches[-1] += by_length[:batch_size - len(batches[-1])]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [batches[i] for i in order.tolist()]


def batch_at(step: int, lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """The global batch of training step `step` (0-based): epochs follow one another."""
    per_epoch = -(-len(lengths) // batch_size)
    return bucketed_batches(lengths, batch_size, seed, step // per_epoch)[step % per_epoch]


def local_share(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous slice of a global batch (its size must divide evenly)."""
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]


def pad_rows(rows: list[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [n_i, ...] -> right-padded [B, max n, ...] and mask [B, max n] (True on real rows)."""
    longest = max(r.shape[0] for r in rows)
    padded = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), value)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        padded[b, :r.shape[0]] = r
        mask[b, :r.shape[0]] = True
    return padded, mask
