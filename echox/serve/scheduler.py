"""The fair queue: one engine answers one turn at a time, off the event loop, first come first served.

An `Engine` shares its weights and echo-decoder cache between sessions, so turns of all
connections go through one queue and run one at a time in a worker thread. A connection has at most one response
in flight (the Realtime API's rule, enforced by the connection), so first-come-first-served order
is round-robin across connections: no connection waits behind two turns of another. While a
turn runs in the worker, the event loop keeps serving every connection's I/O.

A turn is any object with:
  run()       the blocking work, called in the worker thread;
  stop()      ask a running turn to end early (callable from any thread);
  drop()      it was cancelled before it started (called on the event loop; run() never comes);
  finished()  called on the event loop after run() returned or drop(), exactly once;
and the scheduler sets `wait_ms`, how long it waited in the queue, before run().
"""

import asyncio
import threading
import time
from collections import deque


class TurnScheduler:
    def __init__(self):
        self.waiting: deque = deque()
        self.running = None
        self.arrived = asyncio.Event()

    def submit(self, turn):
        turn.queued_at = time.perf_counter()
        self.waiting.append(turn)
        self.arrived.set()

    def position(self, turn) -> int:
        """How many turns will run before this one (0: it is running or next)."""
        ahead = list(self.waiting).index(turn) if turn in self.waiting else 0
        return ahead + (self.running is not None and turn is not self.running)

    def cancel(self, turn) -> bool:
        """Stop a running turn, or drop a waiting one; False when the turn is neither."""
        if turn is self.running:
            turn.stop()
            return True
        if turn in self.waiting:
            self.waiting.remove(turn)
            turn.drop()
            turn.finished()
            return True
        return False

    async def serve(self):
        """Run queued turns one after another, forever (until the task is cancelled)."""
        while True:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            turn = self.waiting.popleft()
            turn.wait_ms = (time.perf_counter() - turn.queued_at) * 1000
            self.running = turn
            try:
                await run_in_thread(turn.run)
            finally:
                self.running = None
                turn.finished()

    def close(self):
        """Ask the running turn to stop (server shutdown); its thread is a daemon and never holds up the exit."""
        if self.running is not None:
            self.running.stop()


async def run_in_thread(work):
    """Run `work()` in a fresh daemon thread and wait for it without blocking the event loop.

    A daemon thread rather than an executor: should the engine ever hang in a turn, the server
    can still shut down (an executor's threads are joined at interpreter exit)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run():
        try:
            work()
        finally:
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=run, name="echox-turn", daemon=True).start()
    await done
