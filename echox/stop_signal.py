"""A stop that any thread may give once, and what giving it does: wake a thread that waits on a
batch, stop a turn's speech. Each turn (and each turn's speech pipeline) has its own, so a stop
given late reaches only what it was meant for."""

import threading
from collections.abc import Callable


class StopSignal:
    def __init__(self):
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.hooks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self):
        """Stop: run every hook given so far, once."""
        with self.lock:
            self.event.set()
            hooks, self.hooks = self.hooks, []
        for hook in hooks:
            hook()

    def on_set(self, hook: Callable[[], None]):
        """Run `hook` when the stop is given, or now if it has been."""
        with self.lock:
            if not self.event.is_set():
                self.hooks.append(hook)
                return
        hook()
