"""Load test of `echox serve` on loopback: N concurrent clients asking spoken questions.

For each N in --clients (default 1 2 4 8 16) a fresh round starts N WebSocket clients at once;
each appends the same question (the demo's speech-like signal, pcm16 at 24 kHz), commits it,
sends response.create and reads until response.done. The server answers --max-batch turns at
once (1: one after another).

With --turns K > 1 the round is a set of live conversations instead of a burst: client i starts
i * --stagger / N seconds into the round and asks K questions on its connection, each once the
answer before it has finished playing (as a listener would hear it) and --pause seconds more.
So about N conversations are under way at any time, in every phase of a turn.

Per turn it records:
  ttfa_ms      from response.create sent to the first response.output_audio.delta received;
               this includes any wait behind other clients' turns (queue_wait_ms, from
               response.done, says how much);
  text_s       from the round's start to the client's last text delta (the LLM's last token);
  underruns    how often the audio ran dry if played from its first chunk on: chunk k is due
               when the audio before it has played (time of chunk 1 + its duration so far, plus
               any earlier stalls); arriving later is an underrun, and playback resumes then;
  stall_ms     the total time playback would have waited;
  errors       error events, failed responses, and clients that did not finish in time.
Per round: tokens/s of text (all clients' output tokens over the time until the last text
delta) and of whole turns (over the time until the last response.done, speech included).
The server runs the built-in tiny random model on the CPU (its speech is noise; the timings are
the pipeline's). Everything is bounded: each round has --round-timeout seconds.

    python bench/serve_load.py --max-batch 16         # writes bench/results/serve/<date>-cpu-batch16.{json,md}
"""

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from echox.audio import resample
from echox.cli import demo_question
from echox.serve.audio_edge import pcm16_bytes
from echox.serve.launch import ServerProcess
from echox.tiny import write_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import environment, percentile, playback, table, write_report  # noqa: E402  (a sibling script, not a package)

API_RATE = 24000
APPEND_SECONDS = 0.1


def question_appends(seconds: float) -> list[str]:
    pcm = pcm16_bytes(resample(demo_question(seconds), 16000, API_RATE))
    step = 2 * int(APPEND_SECONDS * API_RATE)
    return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()})
            for i in range(0, len(pcm), step)]


async def ask(ws, appends: list[str], round_start: float) -> dict:
    """One turn on an open connection: the question, then every event until response.done."""
    errors, arrivals, done, text_at = 0, [], None, None
    for message in appends:
        await ws.send_str(message)
    await ws.send_str(json.dumps({"type": "input_audio_buffer.commit"}))
    await ws.send_str(json.dumps({"type": "response.create"}))
    asked = time.perf_counter()
    async for message in ws:
        event = json.loads(message.data)
        if event["type"] == "error":
            errors += 1
        elif event["type"] == "response.output_text.delta":
            text_at = time.perf_counter() - round_start
        elif event["type"] == "response.output_audio.delta":
            duration = len(base64.b64decode(event["delta"])) / 2 / API_RATE
            arrivals.append((time.perf_counter() - asked, duration))
        elif event["type"] == "response.done":
            done = event["response"]
            break
    finished = time.perf_counter()
    if done is None or done["status"] == "failed":
        errors += 1
    underruns, stall_ms, played_s = playback(arrivals)
    return {"ttfa_ms": arrivals[0][0] * 1000 if arrivals else None, "audio_s": sum(d for _, d in arrivals),
            "underruns": underruns, "stall_ms": stall_ms, "errors": errors, "text_s": text_at,
            "asked_s": asked - round_start, "done_s": finished - round_start,
            "still_playing_s": max(0.0, played_s - (finished - asked)),
            "queue_wait_ms": done["echox"]["queue_wait_ms"] if done else None,
            "output_tokens": done["usage"]["output_tokens"] if done and done.get("usage") else None}


async def conversation(url: str, appends: list[str], round_start: float, turns: int, delay_s: float,
                       pause_s: float) -> list[dict]:
    """One client: after `delay_s`, `turns` questions on one connection, each asked once the answer
    before it has played out and `pause_s` more."""
    await asyncio.sleep(delay_s)
    results = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        for turn in range(turns):
            results.append(await ask(ws, appends, round_start))
            if turn + 1 < turns:
                await asyncio.sleep(results[-1]["still_playing_s"] + pause_s)
    return results


async def one_round(url: str, clients: int, appends: list[str], timeout_s: float, turns: int = 1,
                    stagger_s: float = 0.0, pause_s: float = 0.0) -> list[dict]:
    """Every turn's record (a client that failed or ran out of time: one record with an error)."""
    start = time.perf_counter()
    tasks = [asyncio.create_task(conversation(url, appends, start, turns, i * stagger_s / clients, pause_s))
             for i in range(clients)]
    finished, late = await asyncio.wait(tasks, timeout=timeout_s)
    for task in late:
        task.cancel()
    results = []
    for task in tasks:
        failed = task in late or task.exception() is not None
        results += [{"errors": 1, "ttfa_ms": None}] if failed else task.result()
    return results


def summarize(clients: int, results: list[dict]) -> dict:
    ttfa = [r["ttfa_ms"] for r in results if r.get("ttfa_ms") is not None]
    answered = [r for r in results if "underruns" in r]
    tokens = sum(r["output_tokens"] or 0 for r in answered)
    text_s = max((r["text_s"] for r in answered if r["text_s"] is not None), default=None)
    done_s = max((r["done_s"] for r in answered), default=None)
    return {"clients": clients, "turns": len(results), "answered": len(ttfa), "output_tokens": tokens,
            "text_tokens_per_s": tokens / text_s if text_s else None,
            "turn_tokens_per_s": tokens / done_s if done_s else None, "ttfa_p50_ms": statistics.median(ttfa) if ttfa else None,
            "ttfa_p95_ms": percentile(ttfa, 0.95), "underruns": sum(r["underruns"] for r in answered),
            "stall_ms": sum(r["stall_ms"] for r in answered), "errors": sum(r["errors"] for r in results),
            "audio_s": sum(r["audio_s"] for r in answered),
            "max_queue_wait_ms": max((r["queue_wait_ms"] for r in answered if r["queue_wait_ms"] is not None),
                                     default=None),
            "per_turn": results}


def render(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    rows = [[r["clients"], r["answered"], r["text_tokens_per_s"], r["turn_tokens_per_s"], r["ttfa_p50_ms"],
             r["ttfa_p95_ms"], r["max_queue_wait_ms"], r["audio_s"], r["underruns"], r["stall_ms"], r["errors"]]
            for r in report["rounds"]]
    paced = s.get("turns", 1) > 1
    workload = (f"each client holds a conversation of {s['turns']} spoken questions of {s['question_seconds']:g} s, "
                f"the clients starting evenly over the first {s['stagger_s']:g} s, each question asked "
                f"{s['pause_s']:g} s after the answer before it has played out (token rates are then what the "
                "conversations ask for, not what the engine could do)" if paced else
                f"each client asks a {s['question_seconds']:g} s spoken question, all at once")
    eager = s.get("steps") == "eager"
    command = (f"python bench/serve_load.py --max-batch {s['max_batch']}" + (f" --turns {s['turns']}" if paced else "")
               + (" --eager" if eager else ""))
    return "\n".join([
        f"# echox serve load test, {env['created'][:10]}", "",
        f"{env['device']}, torch {env['torch']}, Python {env['python']}; server: tiny random model, "
        f"{s['threads']} torch thread(s), {'eager' if eager else 'captured'} steps, max batch {s['max_batch']}, "
        f"max_new_tokens {s['max_new_tokens']}, "
        f"max_units {s['max_units']}; {workload}, over loopback (`{command}`).", "",
        *table(["clients", "turns answered", "text tok/s", "turn tok/s", "TTFA p50 ms", "TTFA p95 ms",
                "max queue wait ms", "audio s", "underruns", "stall ms", "errors"], rows), "",
        "TTFA counts from response.create to the first audio delta, queue wait included: the engine answers "
        f"{s['max_batch']} turn(s) at once, the others wait in the queue. Text tok/s: all output tokens over the "
        "time to the last text delta; turn tok/s: over the time to the last response.done (speech included). "
        "An underrun is an audio chunk that "
        "arrived after the audio before it would have finished playing.", ""])


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-batch", type=int, default=1, help="echox serve --max-batch")
    parser.add_argument("--question-seconds", type=float, default=3.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-units", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--turns", type=int, default=1, help="questions per client; > 1: paced conversations")
    parser.add_argument("--stagger", type=float, default=10.0, help="with --turns: the clients start over this many s")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="with --turns: s between an answer's end and the next question")
    parser.add_argument("--round-timeout", type=float, default=None, help="s per round (default 120, +30 per turn)")
    parser.add_argument("--eager", action="store_true", help="echox serve --eager (steps not captured)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serve"))
    args = parser.parse_args(argv)
    timeout = args.round_timeout or 120.0 + 30.0 * (args.turns - 1)
    pacing = (args.turns, args.stagger, args.pause) if args.turns > 1 else (1, 0.0, 0.0)
    appends = question_appends(args.question_seconds)
    with tempfile.TemporaryDirectory() as tiny, ServerProcess(
            ["--model", Path(write_tiny_checkpoint(tiny)), "--threads", args.threads, "--temperature", 0,
             "--max-new-tokens", args.max_new_tokens, "--max-units", args.max_units,
             "--max-connections", max(args.clients), "--max-batch", args.max_batch,
             *(["--eager"] if args.eager else [])]) as server:
        asyncio.run(one_round(server.ws_url, 1, appends, timeout))  # warm-up, not reported
        rounds = []
        for clients in args.clients:
            rounds.append(summarize(clients, asyncio.run(one_round(server.ws_url, clients, appends, timeout,
                                                                   *pacing))))
            print(f"{clients} clients: text {rounds[-1]['text_tokens_per_s']} tok/s, "
                  f"turns {rounds[-1]['turn_tokens_per_s']} tok/s, TTFA p50 {rounds[-1]['ttfa_p50_ms']} ms, p95 {rounds[-1]['ttfa_p95_ms']} ms, "
                  f"underruns {rounds[-1]['underruns']}, errors {rounds[-1]['errors']}", flush=True)
    settings = {"question_seconds": args.question_seconds, "max_new_tokens": args.max_new_tokens,
                "max_units": args.max_units, "threads": args.threads, "max_batch": args.max_batch,
                "turns": pacing[0], "stagger_s": pacing[1], "pause_s": pacing[2],
                "steps": "eager" if args.eager else "captured"}
    report = {"environment": environment("cpu") | {"torch_threads": args.threads}, "settings": settings,
              "rounds": rounds}
    variant = ("-paced" if args.turns > 1 else "") + ("-eager" if args.eager else "")
    stem = write_report(args.out, f"cpu-batch{args.max_batch}{variant}", report, render(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
