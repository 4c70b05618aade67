"""How many CPU threads a piece of work gets, when it does not get the engine's `threads`.

A turn's echo-decoder and vocoder threads (and the LLM's, while they run) each keep the count
the engine was loaded with (`Engine.threads`, pinned as each thread starts), so that they do not
fight over the cores. Work that runs while nothing else computes (a solo turn's speech encoder,
adapter and prefill; a batched prefill while no speech is being made; the echo decoder while the
vocoder waits for units) may take every core instead: its large matrix products share out their
outputs among threads, not their sums, so the bits are the same on any thread count
(tests/test_engine.py checks a whole turn and the released models' shapes; the echo decoder's
one-row products split by split_linear.py, tests/test_split_linear.py).
"""

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux), and no
    more than a container's CPU quota allows (`docker run --cpus 2` on a 64-core host: 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def cpu_quota(root: Path = CGROUP_ROOT, own_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time per period that this process's cgroup may use (quota / period), or None
    when unlimited or not known: the tightest cgroup v2 cpu.max from the process's own group up to
    the root a container sees (a group without a limit of its own runs under its parents'), else
    v1's cpu.cfs_quota_us / cpu.cfs_period_us. Ray counts a node's CPUs from the same files,
    rounding down as `usable_cores` does."""
    quotas = [_ratio(*fields) for group in _own_group_and_parents(root, own_cgroup)
              if (fields := _read_fields(group / "cpu.max")) is not None and len(fields) == 2]
    if not quotas:
        quota, period = (_read_fields(root / "cpu" / name) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        quotas = [_ratio(quota[0], period[0])] if quota and period else []
    limits = [quota for quota in quotas if quota is not None]
    return min(limits) if limits else None


def _own_group_and_parents(root: Path, own_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 folder and each one above it, up to `root`."""
    try:
        own = next((line[4:].strip() for line in own_cgroup.read_text().splitlines() if line.startswith("0::/")), "")
    except OSError:
        own = ""
    group = root / own.strip("/")  # the root itself for "/" (joining "" adds nothing)
    return [group, *[parent for parent in group.parents if parent.is_relative_to(root)]]


def _read_fields(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except OSError:  # no such file (another cgroup version, not Linux) or not readable
        return None


def _ratio(quota: str, period: str) -> float | None:
    """quota / period, None for "max" or -1 (no limit) or anything unreadable."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


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


def pin_threads(count: int):
    """Give the calling thread `count` torch threads. A thread's first torch op hands it the count
    some thread set last (torch keeps one for the process), which another thread may have just
    raised; done first here, that hand-out cannot undo the count set after it."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def every_core():
    """`torch_threads` on every core this process may use."""
    return torch_threads(usable_cores())


EVERY_CORE_THREAD = "echox-every-core"


def on_every_core_running() -> bool:
    """Whether an on_every_core thread is still at work (its caller may have been interrupted)."""
    return any(thread.name == EVERY_CORE_THREAD and thread.is_alive() for thread in threading.enumerate())


def on_every_core(work: Callable[[], T]) -> T:
    """work() on every core, in a thread of its own that ends with it; its result or error.

    GNU OpenMP keeps a pool of workers for each thread that has run ops on several cores, and
    once the process holds more of them than it has cores it stops spinning them between parallel
    regions, so that short regions wait for a worker to wake up: the echo decoder's split products
    (split_linear.py) ran 2.5x slower on 2 cores after the caller's prefill had used both. A
    thread of its own takes its pool with it when it ends."""
    outcome: dict[str, object] = {}
    ended = threading.Event()

    def run():
        try:
            with torch.inference_mode(), every_core():  # inference mode is per thread
                outcome["result"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error
        finally:
            ended.set()

    thread = threading.Thread(target=run, name=EVERY_CORE_THREAD, daemon=True)
    try:
        thread.start()
        ended.wait()
    except BaseException:  # e.g. Ctrl-C: the work writes the caller's state, so it ends before the caller unwinds
        if thread.ident is not None:  # it runs (a Ctrl-C may also come before it starts)
            ended.wait()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
