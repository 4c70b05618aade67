"""How many CPU threads a piece of work gets, when it does not get the engine's `threads`.

A turn's echo-decoder and vocoder threads (and the LLM's, while they run) each keep the count
the engine was loaded with, so that they do not fight over the cores. Work that runs while
nothing else computes (a solo turn's speech encoder, adapter and prefill; a batched prefill
while no speech is being made) may take every core instead: its large matrix products share
out their outputs among threads, not their sums, so the bits are the same on any thread count
(tests/test_engine.py checks a whole turn and the released models' shapes).
"""

import contextlib
import os

import torch


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the enclosed torch CPU ops on `count` intra-op threads, then go back to the calling
    thread's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def every_core():
    """`torch_threads` on every core this process may use."""
    return torch_threads(usable_cores())
