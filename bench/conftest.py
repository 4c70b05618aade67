"""Microbenchmark setup: collect bench_*.py, and one timing helper, `timed`, whose median means:

- CPU: the wall time of one call (3 rounds of one call each).
- CUDA: the device time of one call, from CUDA events around each of ROUNDS x CALLS calls, the
  median of the ROUNDS per-call means. The host's part (Python dispatch, launches) is left out:
  a sleep kernel holds the GPU until the host has queued a whole round, and a memset that
  overwrites L2 runs before each call, outside its events, so every call starts from cold L2 as
  an engine step reading other layers' weights between calls would. A round the host had not
  queued when the hold ran out is counted in the case's extra_info["rounds_not_held"] (its calls
  may include launch gaps); the hold then doubles.

Triton kernels are benched on CUDA only: on CPU they run in the interpreter, whose timings
say nothing about the kernel, so CPU runs time the torch paths at small shapes.
"""

import functools

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
ROUNDS, CALLS = 20, 10  # on CUDA
L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100: 50 MB, H200: 60 MB), as triton.testing.do_bench
MAX_HOLD_CYCLES = 1 << 28  # ~0.13 s: a call that waits on the GPU itself would never be queued in time


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")


def pytest_collection_modifyitems(items):
    if HAS_GPU:  # pytest-benchmark reads its timer from this marker; each case gets a clock of its own
        for item in items:
            item.add_marker(pytest.mark.benchmark(timer=DeviceClock()))


@functools.cache
def l2_flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


class DeviceClock:
    """pytest-benchmark's timer on CUDA. pytest-benchmark reads it before and after each round of
    calls; calls go through `wrap`, which brackets each in CUDA events. The reading after a round
    is the sum of its calls' event intervals, in seconds (the reading before is 0)."""

    def __init__(self):
        self.hold_cycles = 1 << 21  # ~1 ms at 2 GHz, doubled while the host needs longer
        self.hold_end = None  # an event after the hold: set between the readings of a round
        self.intervals = []
        self.rounds_not_held = 0

    def __repr__(self):  # the timer's name in pytest-benchmark's json
        return "CUDA events"

    def wrap(self, fn):
        def call(*args):
            l2_flush_buffer().zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn(*args)
            end.record()
            self.intervals.append((begin, end))
            return out
        return call

    def __call__(self) -> float:
        if self.hold_end is None:  # before a round
            torch.cuda.synchronize()
            self.intervals = []
            torch.cuda._sleep(self.hold_cycles)
            self.hold_end = torch.cuda.Event()
            self.hold_end.record()
            return 0.0
        if self.hold_end.query():  # the GPU got to the round before the host had queued all of it
            self.rounds_not_held += 1
            self.hold_cycles = min(2 * self.hold_cycles, MAX_HOLD_CYCLES)
        torch.cuda.synchronize()
        seconds = sum(begin.elapsed_time(end) for begin, end in self.intervals) / 1000
        self.hold_end = None
        return seconds


@pytest.fixture
def timed(benchmark, request):
    """timed(fn, *args): benchmark fn(*args) as the module's docstring says."""
    def run(fn, *args):
        if not HAS_GPU:
            return benchmark.pedantic(fn, args, rounds=3, warmup_rounds=1, iterations=1)
        clock = request.node.get_closest_marker("benchmark").kwargs["timer"]
        call = clock.wrap(fn)
        call(*args)  # compiles (Triton, torch.compile) outside the rounds that size the hold
        torch.cuda.synchronize()
        for _ in range(3):  # warm-up rounds, which also lengthen the hold to what the host needs
            clock()
            for _ in range(CALLS):
                call(*args)
            clock()
        clock.rounds_not_held = 0
        result = benchmark.pedantic(call, args, rounds=ROUNDS, iterations=CALLS)
        benchmark.extra_info["rounds_not_held"] = clock.rounds_not_held
        return result
    return run
