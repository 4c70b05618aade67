"""What the interpreter lock costs a batched CPU engine: the LLM's decode step beside speech work.

Every torch op called from Python lets go of the interpreter lock and takes it back. A thread
that runs many small ops (a vocoder push: convs, concatenations and slices by the hundred; an
echo-decoder step: a few hundred ops) so makes each op of another Python thread wait for the
lock. A captured step (echox/capture.py: a TorchScript trace on a CPU) runs its ops from C++ and
takes the lock only to enter and leave. This times the LLM's batched decode step (--rows rows,
one torch thread, random weights of --size) over --steps steps, eager and captured, with the
echo decoder's steps the same way (vocoder pushes stay eager, as on a CPU engine): alone; beside a thread that vocodes, one that runs the echo decoder,
one that multiplies large matrices (few ops, each long: it holds the lock seldom), and 16 threads
woken every 5 ms for a little Python each (as per-turn threads are for each token and unit); and
beside a second process that vocodes (an interpreter of its own: only the cores are shared). Per
case: the step's median wall and CPU time, and per step how often its thread gave up the core to
wait (voluntary context switches, Linux).

    python bench/interpreter_lock.py --size tiny     # bench/results/<date>-cpu-interpreter-lock-tiny.{json,md}
"""

import argparse
import multiprocessing
import queue
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_engine import build_engine  # noqa: E402  (sibling scripts, not a package)
from report import environment, table, write_report  # noqa: E402

from echox.streaming_vocoder import StreamingVocoder  # noqa: E402

PUSH_UNITS = 32  # the engine's steady push


def vocode(engine, stop: threading.Event, captured: bool):
    """Push units through a streaming vocoder, a segment of 4 pushes and a flush after another
    (eager either way, as the engine runs them on a CPU)."""
    units = torch.randint(0, engine.vocoder.cfg.num_embeddings, (5 * PUSH_UNITS,), generator=torch.Generator().manual_seed(0))
    while not stop.is_set():
        stream = StreamingVocoder(engine.vocoder)
        for start in range(0, 4 * PUSH_UNITS, PUSH_UNITS):
            stream.push(units[start:start + PUSH_UNITS])
        stream.flush(units[4 * PUSH_UNITS:])


def echo(engine, stop: threading.Event, captured: bool):
    """Decode 64 units of a 20-token segment with the echo decoder, again and again (captured
    or not as the engine's `echo.use_graphs` says: `time_mode` sets it)."""
    segment = torch.randn(20, engine.lm.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    while not stop.is_set():
        for _ in engine.echo.generate(segment, max_units=64):
            pass


def products(engine, stop: threading.Event, captured: bool):
    """Multiply 384 x 384 matrices: a long op at a time, the lock held only between them."""
    a = torch.randn(384, 384)
    while not stop.is_set():
        a @ a


def wakeups(engine, stop: threading.Event, captured: bool, threads: int = 16, period_s: float = 0.005):
    """`threads` threads that each wake every `period_s` for a little Python, as a batched engine's
    per-turn threads do for every token and unit they are handed."""
    queues = [queue.Queue() for _ in range(threads)]

    def wait(items: queue.Queue):
        while items.get() is not None:
            total = 0
            for i in range(200):  # ~10 us of Python per wake-up, as handing on a token or unit takes
                total += i

    waiters = [threading.Thread(target=wait, args=(items,)) for items in queues]
    for waiter in waiters:
        waiter.start()
    while not stop.wait(period_s):
        for items in queues:
            items.put(True)
    for items, waiter in zip(queues, waiters):
        items.put(None)
        waiter.join()


def vocoder_process(size: str, captured: bool, ready, stop):
    """`vocode` in a process of its own (spawned: its own interpreter)."""
    torch.set_num_threads(1)
    with torch.inference_mode():
        engine = build_engine(size, "cpu")
        ready.set()
        vocode(engine, stop, captured)


def time_steps(batcher, rows: int, steps: int, captured: bool) -> dict:
    """The batched decode step, `rows` rows at position 512 (warm-up first): median wall and CPU
    ms, and voluntary context switches per step."""
    feed = torch.full((rows,), batcher.pad_id)
    at = torch.full((rows, 1), 512)
    step = batcher.body_step if captured else batcher.decode
    for _ in range(10):
        step(feed, at)
    walls, cpus = [], []
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.thread_time()
        step(feed, at)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    waits = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
    return {"step_ms": statistics.median(walls) * 1000, "cpu_ms": statistics.median(cpus) * 1000,
            "waits_per_step": waits / steps}


def beside_thread(engine, work, rows: int, steps: int, captured: bool) -> dict:
    stop = threading.Event()
    neighbour = threading.Thread(target=_in_inference_mode, args=(work, engine, stop, captured), daemon=True)
    neighbour.start()
    time.sleep(0.3)  # let it get going
    try:
        return time_steps(engine.text_batcher, rows, steps, captured)
    finally:
        stop.set()
        neighbour.join()


def _in_inference_mode(work, engine, stop, captured):
    with torch.inference_mode():
        work(engine, stop, captured)


def beside_process(engine, size: str, rows: int, steps: int, captured: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    neighbour = context.Process(target=vocoder_process, args=(size, captured, ready, stop), daemon=True)
    neighbour.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the vocoder process did not start")
        time.sleep(0.3)
        return time_steps(engine.text_batcher, rows, steps, captured)
    finally:
        stop.set()
        neighbour.join(30)


NEIGHBOURS = (("a vocoder thread", vocode), ("an echo-decoder thread", echo),
              ("a matrix-product thread", products), ("16 threads woken every 5 ms", wakeups))


def time_mode(engine, size: str, rows: int, steps: int, captured: bool) -> list[dict]:
    """The step alone and beside each neighbour, step and neighbours captured or all eager."""
    engine.echo.use_graphs = captured
    timed = [time_steps(engine.text_batcher, rows, steps, captured)]
    timed += [beside_thread(engine, work, rows, steps, captured) for _, work in NEIGHBOURS]
    return timed + [beside_process(engine, size, rows, steps, captured)]


def render(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    cases = report["cases"]
    rows = [[c["neighbour"], *(x for mode in ("eager", "captured") for x in (
        c[mode]["step_ms"], c[mode]["waits_per_step"], c[mode]["step_ms"] / cases[0][mode]["step_ms"]))]
        for c in cases]
    return "\n".join([
        f"# The interpreter lock and the LLM's decode step, {s['size']} size, {env['created'][:10]}", "",
        f"{env['device']}, torch {env['torch']}, 1 torch thread per thread; the LLM's batched decode step at "
        f"{s['rows']} rows, medians of {s['steps']} steps (`python bench/interpreter_lock.py --size {s['size']}`). "
        "Eager: the step and its neighbours run op by op from Python; captured: the step and the echo "
        "decoder's steps run as TorchScript traces (echox/capture.py), as a CPU engine runs them by default "
        "(its vocoder pushes stay eager).", "",
        *table(["beside", "eager ms", "waits", "x alone", "captured ms", "waits", "x alone"], rows), "",
        "Waits: voluntary context switches of the stepping thread per step (it gave up its core, mostly to wait "
        "for the interpreter lock). A thread of many small ops slows an eager step; the same vocoding in another "
        "process, or a thread of few long ops, much less; threads that only wake often slow it too. A captured "
        "step holds the lock only to enter and leave.", ""])


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with torch.inference_mode():
        engine = build_engine(args.size, "cpu").batched(args.rows)
        modes = {mode: time_mode(engine, args.size, args.rows, args.steps, mode == "captured")
                 for mode in ("eager", "captured")}
    names = ["nothing", *(name for name, _ in NEIGHBOURS), "a vocoder process"]
    cases = [{"neighbour": name, "eager": eager, "captured": captured}
             for name, eager, captured in zip(names, modes["eager"], modes["captured"])]
    settings = {"size": args.size, "rows": args.rows, "steps": args.steps}
    report = {"environment": environment("cpu"), "settings": settings, "cases": cases}
    write_report(args.out, f"cpu-interpreter-lock-{args.size}", report, render(report))
    print(render(report))


if __name__ == "__main__":
    main()
