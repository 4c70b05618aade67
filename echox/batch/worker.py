"""One batching loop in its own thread: requests queue up, join the batch when it has room, and
get their results through a queue of their own.

The loop, in `BatchWorker.run`: admit what waits (each admission may run work of its own, such
as a prefill, between two batched steps), run one step over every active row, repeat; sleep
while nothing is active. A failed step fails every active request, and the loop goes on.

The results of a step go to their callers through a courier thread, all at once: waking a
waiting caller takes the loop ~10-100 us of the interpreter lock per row (the woken thread
contends for it at once), so at 8 rows handing out tokens in the loop itself took 0.6-0.8 ms of
a ~3.5 ms CPU step (0.12-0.15 ms through the courier, `tiny`, 2 cores). The courier wakes them
while the loop runs its next step, in the order the loop gave the results.
"""

import atexit
import contextlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterator

import torch

from ..cpu_threads import pin_threads
from ..errors import EchoXError

FINISHED = object()  # a request's last item


def stopped() -> EchoXError:
    """What a caller gets once the loop has stopped (a new one each time: a raised error keeps the
    frames it passes through)."""
    return EchoXError("the engine has stopped: the program is exiting")


class Courier:
    """Puts results on their callers' queues from a thread of its own, in the order sent. The
    loop's thread collects a step's results (`send`) and hands them over in one go (`dispatch`);
    a single result, with nothing still on its way, it puts itself (one wake-up either way)."""

    def __init__(self, name: str):
        self.outbox: list[tuple[queue.SimpleQueue, object]] = []  # the loop thread's, not yet dispatched
        self.batches: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0  # batches handed over and not yet all put
        self.lock = threading.Lock()
        threading.Thread(target=self.run, name=name, daemon=True).start()

    def send(self, results: queue.SimpleQueue, item):
        self.outbox.append((results, item))

    def dispatch(self):
        if not self.outbox:
            return
        with self.lock:
            itself = len(self.outbox) == 1 and self.pending == 0
            if not itself:
                self.pending += 1
        if itself:
            results, item = self.outbox[0]
            results.put(item)
        else:
            self.batches.put(self.outbox)
        self.outbox = []

    def run(self):
        while True:
            for results, item in self.batches.get():
                results.put(item)
            with self.lock:
                self.pending -= 1


class Request:
    """What a caller asked for, and the queue its results come back through (by the courier of
    the worker it is submitted to)."""

    def __init__(self, ready: torch.cuda.Event | None = None):
        self.ready = ready  # on a GPU: the caller's inputs are written once this event is done
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.courier: Courier | None = None  # set when submitted
        self.cancelled = False  # set by the caller's side; the loop drops the request

    def put(self, item):
        self.courier.send(self.results, item)

    def finish(self, error: BaseException | None = None):
        if error is not None:
            self.put(error)
        self.put(FINISHED)

    def withdraw(self):
        """The caller's side gives up, from any thread: a caller waiting for results wakes at once
        (the end goes straight on its queue), and the loop drops the request, queued or active."""
        self.cancelled = True
        self.results.put(FINISHED)

    def items(self) -> Iterator:
        """Results as they come; a failure is raised here; leaving early cancels the request."""
        try:
            while (item := self.results.get()) is not FINISHED:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled = True


class BatchWorker:
    """The loop; a subclass supplies the batch:
      admit(request) -> bool   take the request into the batch (False: no room yet, it waits);
      step()                   one batched step of every active row, results handed out;
      active() -> bool         whether any row is active;
      fail_active(error)       finish every active request with `error` and drop it.
    `joins_per_step`: how many requests may join between two steps while rows are active (None:
    every one that fits)."""

    joins_per_step: int | None = None

    def __init__(self, name: str, device: torch.device):
        self.device = device
        self.threads = torch.get_num_threads()  # on a CPU, the loop's torch threads: its maker's (the engine's)
        self.waiting: deque[Request] = deque()
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.courier = Courier(f"{name}-courier")
        self.stopping = False

    def start(self):
        self.thread.start()
        RUNNING.add(self)

    def stop(self):
        """End the loop after its current step (what it still holds, or is given, ends with an error)."""
        with self.arrived:
            self.stopping = True
            self.arrived.notify()

    def submit(self, request: Request) -> Request:
        request.courier = self.courier
        with self.arrived:
            if not self.stopping:
                self.waiting.append(request)
                self.arrived.notify()
                return request
        request.results.put(stopped())  # straight to the caller: nothing of this request is on its way
        request.results.put(FINISHED)
        return request

    def run(self):
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if stream is None:
            pin_threads(self.threads)
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
            while not self.stopping:
                self.admit_waiting()
                if not self.active():
                    with self.arrived:
                        while not self.waiting and not self.stopping:
                            self.arrived.wait()
                    continue
                try:
                    self.step()
                except Exception as error:  # noqa: BLE001 - handed to every caller of the failed step
                    self.fail_active(error)
                self.courier.dispatch()
            self.end_held()

    def end_held(self):
        """The loop has stopped: what it holds and what still queues end with an error, so that no
        caller waits for results that will never come (a request submitted later ends at once)."""
        self.fail_active(stopped())
        with self.arrived:
            waiting, self.waiting = self.waiting, deque()
        for request in waiting:
            request.finish(stopped())
        self.courier.dispatch()

    def admit_waiting(self):
        """Admit waiting requests in arrival order until one finds no room, or `joins_per_step` joined."""
        joined = 0
        while True:
            self.courier.dispatch()  # the last admission's results (a prefill's token) go before the next
            with self.arrived:
                # Withdrawn or abandoned while queued: dropped wherever they wait, never admitted
                # (their callers have their end already, or no longer read).
                if any(request.cancelled for request in self.waiting):
                    self.waiting = deque(request for request in self.waiting if not request.cancelled)
                if not self.waiting or (self.joins_per_step is not None and joined >= self.joins_per_step
                                        and self.active()):
                    return
                request = self.waiting[0]
            if request.ready is not None:
                torch.cuda.current_stream().wait_event(request.ready)
            try:
                if not self.admit(request):
                    return
                joined += 1
            except Exception as error:  # noqa: BLE001 - the request's own failure (e.g. too long)
                request.finish(error)
            self.pop(request)

    def pop(self, request: Request) -> Request:
        with self.arrived:
            self.waiting.remove(request)
        return request

    def queued(self) -> int:
        with self.arrived:
            return len(self.waiting)


RUNNING: "weakref.WeakSet[BatchWorker]" = weakref.WeakSet()


@atexit.register
def stop_every_loop():
    """Before the interpreter ends, stop the loops between two steps: a daemon thread still inside a
    torch op then (say, finishing a cancelled turn's row) aborts the process as it returns
    ("terminate called without an active exception", exit code 134)."""
    workers = list(RUNNING)
    for worker in workers:
        worker.stop()
    for worker in workers:
        worker.thread.join(timeout=30)
