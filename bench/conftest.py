"""Microbenchmark setup: collect bench_*.py, and one timing helper that is honest on GPUs.

On CUDA every timed call ends in a synchronize, so the time is the kernel's, not the launch's.
Triton kernels are benched on CUDA only: on CPU they run in the interpreter, whose timings
say nothing about the kernel, so CPU runs time the torch paths at small shapes.
"""

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")


@pytest.fixture
def timed(benchmark):
    """timed(fn, *args): benchmark fn(*args), a few rounds on CPU, more on GPU."""
    def run(fn, *args):
        def call():
            out = fn(*args)
            if HAS_GPU:
                torch.cuda.synchronize()
            return out
        rounds = 50 if HAS_GPU else 3
        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=5 if HAS_GPU else 1, iterations=1)
    return run

