"""The fair queue and admission control: at most `capacity` turns run at once, off the event
loop, the rest wait first come first served.

An engine without batching shares its weights and echo-decoder cache between sessions, so its
turns run one at a time (capacity 1). A batched engine (`echox serve --max-batch N`) decodes up
to N turns as rows of shared steps: capacity N, one worker thread per running turn. A
connection has at most one response in flight (the Realtime API's rule, enforced by the
connection), so first-come-first-served order is round-robin across connections: no connection
waits behind two turns of another. While turns run, the event loop keeps serving every
connection's I/O.

A turn is any object with:
  run()       the blocking work, called in a worker thread;
  stop()      ask a running turn to end early (callable from any thread);
  drop()      it was cancelled before it started (called on the event loop; run() never comes);
  finished()  called on the event loop after run() returned, drop(), or a thread that could not start,
              exactly once;
and the scheduler sets `wait_ms`, how long it waited in the queue, before run().
"""

import asyncio
import logging
import threading
import time
from collections import deque

log = logging.getLogger("echox.serve")


class TurnScheduler:
    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self.waiting: deque = deque()
        self.running: set = set()
        self.changed = asyncio.Event()  # a turn arrived or one finished
        self.closed = False  # the server is stopping: no turn starts any more

    def submit(self, turn):
        turn.queued_at = time.perf_counter()
        self.waiting.append(turn)
        if self.closed:  # the server is stopping: it ends unstarted, once its caller has announced it
            asyncio.get_running_loop().call_soon(self.cancel, turn)
        else:
            self.changed.set()

    def turns_ahead(self, turn) -> int:
        """How many turns must end before this one can start (0: it runs, or starts now)."""
        if turn not in self.waiting:
            return 0
        return max(0, list(self.waiting).index(turn) + 1 - (self.capacity - len(self.running)))

    def cancel(self, turn) -> bool:
        """Stop a running turn, or drop a waiting one; False when the turn is neither."""
        if turn in self.running:
            turn.stop()
            return True
        if turn in self.waiting:
            self.waiting.remove(turn)
            turn.drop()
            turn.finished()
            return True
        return False

    async def serve(self):
        """Start queued turns whenever fewer than `capacity` run, forever (until cancelled)."""
        while True:
            while self.waiting and len(self.running) < self.capacity and not self.closed:
                self.start(self.waiting.popleft())
            self.changed.clear()
            await self.changed.wait()

    def start(self, turn):
        turn.wait_ms = (time.perf_counter() - turn.queued_at) * 1000
        self.running.add(turn)
        task = asyncio.create_task(run_in_thread(turn.run))
        task.add_done_callback(lambda task: self.end(turn, task))

    def end(self, turn, task: asyncio.Task):
        if not task.cancelled() and task.exception() is not None:  # its thread did not start
            log.error("a turn could not run", exc_info=task.exception())
        self.running.discard(turn)
        turn.finished()
        self.changed.set()

    def close(self):
        """Server shutdown: the waiting turns end unstarted, the running ones are asked to stop (their
        threads are daemons and never hold up the exit), and later turns end as soon as they come."""
        self.closed = True
        while self.waiting:
            self.cancel(self.waiting[0])
        for turn in list(self.running):
            turn.stop()

    async def drained(self, seconds: float):
        """Wait until no turn runs, for at most `seconds`."""
        deadline = time.monotonic() + seconds
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


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
