"""How `echox chat` and `echox demo` take Ctrl-C.

The first Ctrl-C stops the turn: a KeyboardInterrupt in the main thread, after which the command
writes the audio spoken so far and exits 130. What it waits for then (the speech threads and the
prefill's thread leaving their torch ops, the WAV being written) must not be cut short by a second
one: a KeyboardInterrupt raised there left threads inside torch ops as the interpreter ended, which
aborts the process ("terminate called without an active exception"), or broke an atexit callback.
So a repeat within REPEAT_S of the first is the same Ctrl-C (a double tap, or a launcher passing the
terminal's signal on) and is ignored; a later one ends the process at once with one line and
status 130, as `echox serve` does (serve/stopping.py). os._exit runs no C++ destructors, so threads
still inside torch cannot abort it.

While torch and numpy are imported, SIGINT is held back instead: a KeyboardInterrupt raised inside
their C code was swallowed (the turn then ran to its end) or aborted the process. It is delivered,
as an ordinary KeyboardInterrupt, when the imports are done.
"""

import atexit
import contextlib
import os
import signal
import threading
import time
from typing import Callable, Iterator

REPEAT_S = 0.5  # a person's second Ctrl-C comes later than this; a launcher's copy of the first, sooner


def say(line: str):
    """One line on stderr, written whole: a signal handler may interrupt a print in progress, and
    printing from it would then fail (a reentrant write into the same buffer)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:  # stderr is gone: nobody to tell
        pass


def exit_at_once(status: int):
    """End the process now, leaving no temporary file being written behind (outputs.py): os._exit
    runs no `finally`, no atexit hook and no C++ destructor, so threads inside torch cannot abort it."""
    from .outputs import remove_unfinished
    try:
        remove_unfinished()
    finally:
        os._exit(status)


class StopHandler:
    """A signal handler for stopping: the first signal calls `first(signum)` (in the main thread; it
    may raise there); a repeat within REPEAT_S of it is the same press, and is ignored; a later one
    calls `forced(signum)` and ends the process at once, status 128 + its number."""

    def __init__(self, first: Callable[[int], None], forced: Callable[[int], None]):
        self.first, self.forced = first, forced
        self.first_at: float | None = None  # when the first signal came

    def __call__(self, signum: int, frame):
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.first(signum)
        elif time.monotonic() - self.first_at >= REPEAT_S:
            try:
                self.forced(signum)
            finally:
                exit_at_once(128 + signum)


ON_EXIT: list[StopHandler] = []  # the handler of the last block that took a Ctrl-C


def _stop_once_while_exiting():
    """An exit hook, (re)registered as a block that took a Ctrl-C ends, after the engine's hooks were
    (its modules are imported inside the block), so that it runs before them: a Ctrl-C while they
    wait for the stopped turn's threads is the same press, or ends the process at once."""
    signal.signal(signal.SIGINT, ON_EXIT[-1])


@contextlib.contextmanager
def ctrl_c_stops_once() -> Iterator[None]:
    """Within the block, the first SIGINT raises KeyboardInterrupt and a later one (after REPEAT_S)
    ends the process at once. The handler before it is put back as the block ends; after a Ctrl-C
    the block's comes back while the process ends (atexit, where the engine's hooks wait for the
    stopped turn's threads and a KeyboardInterrupt aborted the process), so that a program that
    called `echox.cli.main` goes on with its own until then. Only the main thread can set signal
    handlers: elsewhere, the block runs with Python's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int):
        raise KeyboardInterrupt

    def forced(signum: int):
        say("echox: stopped at once by a second Ctrl-C (nothing more written)")

    handler = StopHandler(interrupt, forced)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if handler.first_at is not None:
            ON_EXIT.append(handler)
            atexit.unregister(_stop_once_while_exiting)  # registered last, it runs first
            atexit.register(_stop_once_while_exiting)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """SIGINT blocked in this thread while the block runs; one that came meanwhile is delivered after.
    Windows has no signal masks: there the block runs as it is."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
