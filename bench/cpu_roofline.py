"""How close the speech path runs to this CPU's limits: one thread, fp32, by default the released
echo decoder and vocoder (the "voice" size of random_engine.py).

The machine, measured first:
  peak_gflops       a 2048 x 2048 x 2048 fp32 matrix product;
  read_gbs          summing a 400 MB tensor: bytes per second the memory gives one thread
                    (and, as read_gbs_all_threads, every core);
  linear_gbs        F.linear of one row over matrices the size of the echo decoder's: the
                    matrix-vector product the engine runs (its bits are the official code's).
The echo decoder writes one unit token per step and reads all of its step's weights (body,
input projection, unit head) from memory, which they do not fit in; so a step takes at least
  step_bytes / read_gbs      (any kernel), or step_bytes / linear_gbs (the kernel it runs),
against step_ms, measured (a segment's steps alone, captured; its prefill apart, prefill_ms).
The vocoder's work is compute: its conv FLOPs per unit (torch's FLOP counter over the offline
vocoder) at peak_gflops, against its streaming cost per unit at the engine's push pattern.
From these, the pipeline's fill (a segment's hidden states in -> the first push can start):
  fill_floor_ms = prefill_ms + (lookahead + 1) * step_bytes / linear_gbs,
which bench/speech_path.py's fill_ms can be held against. (At smaller sizes the weights stay in
the cache and each op's fixed cost dominates: the floors say little there.)

    python bench/cpu_roofline.py        # writes bench/results/<date>-cpu-roofline-voice.{json,md}
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from echox.cpu_threads import every_core

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_engine import build_engine  # noqa: E402  (sibling scripts, not a package)
from report import environment, table, write_report  # noqa: E402


def timed_ms(run, repeats: int) -> float:
    """Median wall time of `run()` in ms, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def machine(repeats: int) -> dict:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / timed_ms(lambda: a @ b, repeats) / 1e6
    big = torch.randn(100_000_000)
    read = big.numel() * 4 / timed_ms(big.sum, repeats) / 1e6
    with every_core():
        read_all = big.numel() * 4 / timed_ms(big.sum, repeats) / 1e6
    return {"peak_gflops": peak, "read_gbs": read, "read_gbs_all_threads": read_all}


def step_weights(echo) -> list[torch.Tensor]:
    """The matrices one echo-decoder step reads: input projection, body, unit head."""
    matrices = [echo.adapter.weight, echo.unit_head]
    return matrices + [p for p in echo.body.parameters() if p.dim() == 2]


def linear_gbs(weights: list[torch.Tensor], repeats: int) -> float:
    """F.linear of one row over fresh matrices of these shapes, more of them than the cache holds."""
    copies = max(1, -(-200_000_000 // sum(w.numel() * 4 for w in weights)))  # >= 200 MB in all
    matrices = [torch.randn(w.shape) for _ in range(copies) for w in weights]
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in matrices}
    total = sum(w.numel() * 4 for w in matrices)
    return total / timed_ms(lambda: [F.linear(rows[w.shape[1]], w) for w in matrices], repeats) / 1e6


SEGMENT_TOKENS = 38  # the first segment of bench/speech_path.py's turn


def echo_costs(engine, repeats: int, units: int = 64) -> dict:
    """ms of a segment's echo-decoder prefill and of each later step (captured, nothing else running)."""
    segment = torch.randn(SEGMENT_TOKENS, engine.echo.cfg.llm_hidden_size, generator=torch.Generator().manual_seed(0))
    prefills, steps = [], []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        marks = [time.perf_counter() for _ in engine.echo.generate(segment, max_units=units)]
        prefills.append((marks[0] - started) * 1000)
        steps.append((marks[-1] - marks[0]) * 1000 / (len(marks) - 1))
    return {"prefill_ms": statistics.median(prefills[1:]), "step_ms": statistics.median(steps[1:]),
            "units_timed": len(marks)}


def vocoder_costs(engine, repeats: int, count: int = 130, push_units: int = 32) -> dict:
    """FLOPs per unit of the offline vocoder, and the streaming cost per unit as the engine pushes
    (look-ahead + 1 units, then `push_units` at a time, the rest with the flush)."""
    units = torch.randint(0, engine.vocoder.dict.num_embeddings, (count,), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        engine.vocoder(units, speaker=engine.speaker)
    first = engine.voice().lookahead_units + 1

    def stream():
        voice = engine.voice()
        voice.push(units[:first])
        at = first
        while at + push_units < count:
            voice.push(units[at:at + push_units])
            at += push_units
        voice.flush(units[at:])
    stream_ms = timed_ms(stream, repeats)
    return {"gflop_per_unit": counter.get_total_flops() / count / 1e9, "stream_ms_per_unit": stream_ms / count,
            "lookahead_units": first - 1}


def measure(args) -> dict:
    torch.set_num_threads(1)
    engine = build_engine(args.size, "cpu")
    with torch.inference_mode():
        limits = machine(args.repeats)
        weights = step_weights(engine.echo)
        step_bytes = sum(w.numel() * w.element_size() for w in weights)
        echo = echo_costs(engine, args.repeats) | {"step_bytes": step_bytes,
                                                   "linear_gbs": linear_gbs(weights, args.repeats)}
        vocoder = vocoder_costs(engine, args.repeats)
    echo |= {"floor_ms_any_kernel": step_bytes / limits["read_gbs"] / 1e6,
             "floor_ms_engine_kernel": step_bytes / echo["linear_gbs"] / 1e6}
    vocoder["floor_ms_per_unit"] = vocoder["gflop_per_unit"] / limits["peak_gflops"] * 1000
    fill_floor = echo["prefill_ms"] + (vocoder["lookahead_units"] + 1) * echo["floor_ms_engine_kernel"]
    return {"environment": environment("cpu"), "size": args.size, "machine": limits, "echo": echo, "vocoder": vocoder,
            "fill_floor_ms": fill_floor}


def render(report: dict) -> str:
    env, m, e, v = report["environment"], report["machine"], report["echo"], report["vocoder"]
    rows = [
        ["echo decoder step (ms / unit)", e["step_ms"], e["floor_ms_engine_kernel"], e["step_ms"] / e["floor_ms_engine_kernel"],
         f"{e['step_bytes'] / 1e6:.1f} MB of weights at {e['linear_gbs']:.1f} GB/s (F.linear, one row); "
         f"at the {m['read_gbs']:.1f} GB/s a plain read gets: {e['floor_ms_any_kernel']:.2f} ms"],
        ["vocoder, streamed (ms / unit)", v["stream_ms_per_unit"], v["floor_ms_per_unit"],
         v["stream_ms_per_unit"] / v["floor_ms_per_unit"],
         f"{v['gflop_per_unit']:.3f} GFLOP per unit at {m['peak_gflops']:.0f} GFLOP/s"],
    ]
    return "\n".join([
        f"# The speech path against this CPU's limits, {report['size']} size, {env['created'][:10]}", "",
        f"{env['device']}, torch {env['torch']}, one thread, fp32, random weights; "
        f"`python bench/cpu_roofline.py --size {report['size']}`. Machine: {m['peak_gflops']:.0f} GFLOP/s "
        f"(2048^3 matrix product), {m['read_gbs']:.1f} GB/s read by one thread, "
        f"{m['read_gbs_all_threads']:.1f} GB/s by every core.", "",
        *table(["stage", "measured", "floor", "measured / floor", "floor from"], rows), "",
        f"Echo-decoder prefill of a {SEGMENT_TOKENS}-token segment: {e['prefill_ms']:.1f} ms. The pipeline's fill (a segment "
        f"in -> the vocoder's first push, which waits for {v['lookahead_units'] + 1} units) is at least "
        f"{report['fill_floor_ms']:.0f} ms with the engine's kernels.", ""])


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="voice", help="random_engine.py size (voice: the released speech path)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    report = measure(args)
    write_report(args.out, f"cpu-roofline-{args.size}", report, render(report))
    print(render(report))


if __name__ == "__main__":
    main()
