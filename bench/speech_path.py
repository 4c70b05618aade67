"""Where a spoken turn's time goes on the CPU, and what exact streaming costs the vocoder.

For one size (default "voice": the tiny LLM and Whisper with the released echo decoder and
vocoder, see random_engine.py) and each torch thread count asked for, this runs a warm-up turn,
then `--repeats` turns (a 3 s question, greedy, at most `--max-new-tokens` tokens, at most
`--max-units` unit tokens per segment), and reports medians of:
  turn_ms            wall time of the whole turn, respond() to TurnDone;
  critical_path_ms   pre-LLM work (encoder + adapter + prefill) + max(LLM decoding, echo decoder,
                     vocoder): the turn's length if its three threads overlapped perfectly;
  llm_ms, echo_ms, vocoder_ms, time_to_first_audio_ms   from the turn's trace;
  fill_ms            from the end of the pre-LLM work to the vocoder's first push: the LLM writing
                     the first segment and the echo decoder its first units (the pipeline filling);
  vocoder_idle_ms    between the vocoder's first push and the end of its last, the time it was
                     not pushing (waiting for units);
  underruns, stall_ms   how often, and how long in all, a player starting at the first chunk
                     would have run dry (as bench/serve_load.py counts them).
Then the vocoder alone on the last turn's units, segment by segment, each timed `--repeats`
times: `stream_ms` pushes them as the engine does (look-ahead + 1 units, then `push_units` at a
time, the rest with the flush) and `offline_ms` runs `Vocoder.forward` on them.

    python bench/speech_path.py --threads 1 2 --out bench/results/<date>-cpu-speech.jsonl
    python bench/speech_path.py --device cuda --threads 1 --out ...-gpu-speech.jsonl   # (bench/gpu.sh)
It imports `echox` from wherever Python finds it, so the same script times an older checkout
(PYTHONPATH=<checkout>) for a before/after comparison; `--label` names the run.
"""

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from echox.audio import SAMPLE_RATE
from echox.engine import AudioChunk, TurnDone
from echox.sampling import GREEDY
from echox.segmenter import RELEASED_SEGMENTER
from echox.streaming_vocoder import StreamingVocoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import question  # noqa: E402  (sibling scripts, not a package)
from random_engine import build_engine  # noqa: E402
from report import fmt, playback  # noqa: E402

def turn_numbers(trace: dict, wall_ms: float) -> dict:
    t = trace["timings_ms"]
    llm_ms = t["decode_per_token"] * len(trace["tokens"])
    pre_llm = t.get("encoder", 0.0) + t.get("adapter", 0.0) + t["prefill"]
    timeline = {}
    if t.get("vocoder_start") is not None:  # a checkout from before the trace had them has neither
        timeline = {"fill_ms": t["vocoder_start"] - pre_llm,
                    "vocoder_idle_ms": t["vocoder_end"] - t["vocoder_start"] - t["vocoder"]}
    return {"turn_ms": wall_ms, "critical_path_ms": pre_llm + max(llm_ms, t["echo_decoder"], t["vocoder"]),
            "pre_llm_ms": pre_llm, "llm_ms": llm_ms, "echo_ms": t["echo_decoder"], "vocoder_ms": t["vocoder"],
            "time_to_first_audio_ms": t["time_to_first_audio"]} | timeline


def timed_turn(session, audio: torch.Tensor) -> tuple[dict, dict]:
    """The turn's trace and numbers, with how its audio would play from the first chunk on."""
    session.reset()
    started, arrivals = time.perf_counter(), []
    for event in session.respond(audio=audio):
        if isinstance(event, AudioChunk):
            arrivals.append((time.perf_counter() - started, event.samples.numel() / SAMPLE_RATE))
        elif isinstance(event, TurnDone):
            trace = event.trace
    underruns, stall_ms, _ = playback(arrivals)
    return trace, turn_numbers(trace, (time.perf_counter() - started) * 1000) | {"underruns": underruns,
                                                                                  "stall_ms": stall_ms}


def engine_pushes(engine, unit_tokens: list[int], first: int, then: int) -> list[torch.Tensor]:
    """A segment's units in the engine's vocoder calls (speech_pipeline.py): pushes once `first`,
    then `then`, units are waiting (a unit token brings one or more), and the rest with the flush."""
    calls, waiting, batch = [], [], first
    for token in unit_tokens:
        waiting.extend(engine.echo.units_of([token]))
        if len(waiting) >= batch:
            calls.append(torch.tensor(waiting))
            waiting, batch = [], then
    return calls + [torch.tensor(waiting, dtype=torch.int64)]


def flush_with(voice: StreamingVocoder, units: torch.Tensor) -> list[torch.Tensor]:
    """The segment's last vocoder call; a checkout from before `flush(units)` pushes, then flushes."""
    if "units" in inspect.signature(voice.flush).parameters:
        return [voice.flush(units)]
    return [voice.push(units), voice.flush()]


def vocoder_costs(engine, segments: list[list[int]], push_units: int, repeats: int) -> dict:
    """Streaming (the engine's calls, on a GPU its captured pushes) and offline vocoding of the
    same units, in ms (medians)."""
    vocoder, device = engine.vocoder, engine.device
    first = StreamingVocoder(vocoder).lookahead_units + 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def stream(unit_tokens: list[int]):
        voice = engine.voice()
        *pushes, last = engine_pushes(engine, unit_tokens, first, push_units)
        return [voice.push(units.to(device)) for units in pushes] + flush_with(voice, last.to(device))

    def offline(unit_tokens: list[int]):
        return vocoder(torch.tensor(engine.echo.units_of(unit_tokens), device=device), speaker=engine.speaker)

    out = {}
    segments = [s for s in segments if engine.echo.units_of(s)]
    for name, run in (("stream_ms", stream), ("offline_ms", offline)):
        runs = []
        for _ in range(repeats + 1):  # the first run warms up
            sync()
            started = time.perf_counter()
            for unit_tokens in segments:
                run(unit_tokens)
            sync()
            runs.append((time.perf_counter() - started) * 1000)
        out[name] = statistics.median(runs[1:])
    out["stream_over_offline"] = out["stream_ms"] / out["offline_ms"]
    out["units"] = sum(len(engine.echo.units_of(s)) for s in segments)
    return out


def measure(size: str, threads: int, args) -> dict:
    torch.set_num_threads(threads)
    engine = build_engine(size, args.device, graphs=not args.eager)
    session = engine.session(sampling=GREEDY, segmenter=RELEASED_SEGMENTER, max_new_tokens=args.max_new_tokens,
                             max_units=args.max_units, push_units=args.push_units)
    audio = question(args.question_seconds)
    with torch.inference_mode():
        timed_turn(session, audio)  # warm-up
        turns = [timed_turn(session, audio) for _ in range(args.repeats)]
        trace = turns[-1][0]
        segments = [segment["unit_tokens"] for segment in trace["segments"]]
        vocoder = vocoder_costs(engine, segments, args.push_units, args.repeats)
    numbers = {key: statistics.median(n[key] for _, n in turns) for key in turns[0][1]}
    audio_s = sum(segment["samples"] for segment in trace["segments"]) / 16000
    return {"label": args.label + (", eager" if args.eager else ""), "size": size, "device": device_name(args.device),
            "threads": threads, "push_units": args.push_units,
            "repeats": args.repeats,
            "tokens": len(trace["tokens"]), "segments": len(segments), "audio_s": audio_s,
            **numbers, "turn_over_critical_path": numbers["turn_ms"] / numbers["critical_path_ms"],
            "vocoder_alone": vocoder}


def markdown(rows: list[dict]) -> str:
    lines = ["| run | threads | push units | tokens | segments | audio s | turn ms | critical path ms | turn / critical path | "
             "pre-LLM ms | LLM ms | echo ms | vocoder ms | fill ms | vocoder idle ms | TTFA ms | underruns | stall ms | "
             "vocoder stream ms | vocoder offline ms | stream / offline |",
             "|" + "---|" * 21]
    for r in rows:
        v = r["vocoder_alone"]
        lines.append(f"| {r['label']} | {r['threads']} | {r.get('push_units', 32)} | {r['tokens']} | {r['segments']} | {r['audio_s']:.2f} | "
                     f"{r['turn_ms']:.0f} | {r['critical_path_ms']:.0f} | {r['turn_over_critical_path']:.2f} | "
                     f"{r['pre_llm_ms']:.0f} | {r['llm_ms']:.0f} | {r['echo_ms']:.0f} | {r['vocoder_ms']:.0f} | "
                     f"{fmt(r.get('fill_ms'), 0)} | {fmt(r.get('vocoder_idle_ms'), 0)} | "
                     f"{r['time_to_first_audio_ms']:.0f} | {fmt(r.get('underruns'), 0)} | {fmt(r.get('stall_ms'), 0)} | "
                     f"{v['stream_ms']:.0f} | {v['offline_ms']:.0f} | "
                     f"{v['stream_over_offline']:.2f} |")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    import os
    import platform
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def header(device: str) -> str:
    return (f"# Speech path of a turn: {device_name(device)}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}\n\n"
            "Random weights; medians. `turn / critical path` is the turn's wall time over pre-LLM work + "
            "max(LLM, echo decoder, vocoder); `stream / offline` is the vocoder alone on the turn's units, "
            "pushed as the engine pushes them vs `Vocoder.forward`. Made by `bench/speech_path.py`.\n\n")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="voice")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU --threads sets only the host's ops)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--max-units", type=int, default=64)
    parser.add_argument("--push-units", type=int, default=32, help="the session's push_units")
    parser.add_argument("--question-seconds", type=float, default=3.0)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--eager", action="store_true", help="steps op by op, not captured (echox/capture.py)")
    parser.add_argument("--out", type=Path, help="append each JSON object as a line to this file")
    parser.add_argument("--markdown", type=Path, help="write the table of every line of --out here")
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        row = measure(args.size, threads, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if args.out and args.markdown:
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        args.markdown.write_text(header(args.device) + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
