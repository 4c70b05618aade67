"""How `echox serve` and `echox serve-ray` stop on SIGINT (Ctrl-C) and SIGTERM.

The first signal asks for a graceful stop: answers end, every WebSocket is closed, Ray's replicas
stop their `echox serve`. That takes seconds, or longer with a turn stuck in the engine. A second
one, during it, ends the process at once, with every process it started (found in /proc, so on
Linux: a local Ray's processes, its replicas and their `echox serve`). A repeat within REPEAT_S (0.5 s;
ctrl_c.StopHandler, shared with chat and demo) of the first is the same Ctrl-C, not a second one:
some launchers pass the terminal's SIGINT on to a process that got it from the terminal already.

Plain `signal.signal` handlers, not asyncio's `add_signal_handler`: asyncio learns of a signal
through a byte written to its wakeup socket, which is lost when that socket is full, as it is
after a burst of client events (each one's answer wakes the loop through the same socket).
"""

import os
import signal
from pathlib import Path
from typing import Callable

from ..ctrl_c import StopHandler, say

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FINDS_CHILDREN = Path("/proc/self/stat").exists()  # Linux: a forced stop can find what this process started


def on_stop_signals(graceful: Callable[[], None], who: str, forced_note: str = ""):
    """The first SIGINT or SIGTERM calls `graceful()` in the main thread (it may raise there); any
    later one ends the process at once with status 128 + its number (130 for Ctrl-C), saying so in
    one line `who: stopped at once by a second SIGINT` + `forced_note`."""
    def first(signum: int):
        say(f"{who}: stopping (Ctrl-C again stops at once)")
        graceful()

    def forced(signum: int):
        kill_descendants()
        say(f"{who}: stopped at once by a second {signal.Signals(signum).name}{forced_note}")

    handler = StopHandler(first, forced)  # one for both signals: a SIGTERM after a SIGINT is a second one
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def kill_descendants():
    """SIGKILL every process this one started, and theirs. Each is stopped (SIGSTOP) as it is found,
    so none starts another, out of sight, while the tree is walked."""
    found: set[int] = set()
    while new := descendants(os.getpid()) - found:
        send_each(new, signal.SIGSTOP)
        found |= new
    send_each(found, signal.SIGKILL)


def descendants(root: int) -> set[int]:
    """The processes below `root` (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (name) state ppid ...", where the name may hold spaces and parentheses
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # it ended while we looked
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, below = set(), [root]
    while below:
        for child in children.get(below.pop(), []):
            found.add(child)
            below.append(child)
    return found


def send_each(pids: set[int], sig: signal.Signals):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it ended on its own meanwhile
            pass
