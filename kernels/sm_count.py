"""How many streaming multiprocessors a launch can fill: grids are sized from it, never from data."""

import functools

import torch

H100_SMS = 132  # H100 SXM and H200


@functools.cache
def sm_count(device: torch.device) -> int | None:
    """The SM count of a CUDA device; None off the GPU (the interpreter), where callers choose."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count
