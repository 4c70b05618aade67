"""How many torch intra-op threads echox lets a process ask for: a few per core.

Beyond a few per core threads only fight over the cores; tens of thousands failed to start inside
OpenMP ("libgomp: Thread creation failed", the process gone with no Python error), and a million
crashed it. Torch-free, so that the command line refuses `--threads` while parsing, before torch's
import, with the same bound as `echox.load`.
"""

import os

MAX_THREADS_PER_CORE = 4


def max_threads() -> int:
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
