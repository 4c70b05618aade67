"""Many conversations on one batched engine, in process: aggregate token rate and time to first audio.

For one size (random_engine.py) and each N in --conversations (default 1 2 4 8 16), N threads
each hold a session of one batched engine (max_batch = the largest N) and ask one spoken
question at the same moment (at most --max-new-tokens tokens; --sampling greedy, or released:
the released temperature 0.2 / top-p 0.9, a server's default). Per round it records:
  text_tokens_per_s   all conversations' tokens over the time from the start to the last token;
  turn_tokens_per_s   the same over the time to the last TurnDone (speech included);
  ttfa_p50/p95_ms     each conversation's time from the start to its first audio chunk;
  decode_tokens_per_s tokens per second over decode time, measured as decode_timed says: batched,
                      the time inside TextBatcher.step (prefills and waits left out); unbatched,
                      the turn's decode_per_token, its whole token loop (the text and segment
                      hand-offs to the speech path included), so the two rows are not like for like;
  rows_per_step       the mean number of turns in the LLM's decode steps;
  prompt_positions    the median prompt length, in positions (with random weights the adapter keeps
                      nearly all 750 speech frames, whatever the question's length: see the step table);
  vocoder_ms_per_unit wall time of the batched vocoder's calls per unit they vocoded (what
                      batching the pushes of many streams saves per stream shows here), and
  pushes_per_call     the mean number of streams' pushes in one of those calls;
  cores_busy          the process's CPU time over the round's wall time (how many cores it kept busy),
  *_loop_busy         and each batch loop thread's (LLM, echo decoder, vocoder) over the same wall time:
                      which stage paces a round, and whether the machine ran out of cores.
With --text-only every conversation asks for a written answer (`Session.speak = False`): no echo
decoder or vocoder work, so the LLM's batching shows without the speech path beside it (TTFA and
the vocoder columns are then empty). With --written-question every conversation types its question
instead (a prompt of a few dozen positions: with random weights a spoken one is ~950, see the step
table). Each round runs --repeats times after a warm-up round; the
report has the medians, and a first row with the unbatched engine answering one conversation
(what batch 1 must not fall behind).
Then the LLM's batched decode step alone (nothing else running; on a GPU the captured graph) at
each width, the body and the output head's token selection with the run's sampling: its wall time,
and the tokens per second it would give with every row busy; at the rounds' prompt length (each
row reads its own KV cache, so at long prompts the step's cost grows with its rows) and at 128.

    python bench/batch_engine.py --size tiny                 # CPU
    python bench/batch_engine.py --size 8b --device cuda --sampling released   # GPU (bench/gpu.sh)
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from echox.engine import AudioChunk, TextDelta, TurnDone
from echox.sampling import GREEDY, RELEASED_SAMPLING, head_select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import question  # noqa: E402  (sibling scripts, not a package)
from random_engine import build_engine  # noqa: E402
from report import environment, percentile, table, write_report  # noqa: E402


SAMPLING = {"greedy": GREEDY, "released": RELEASED_SAMPLING}
WRITTEN_QUESTION = "What should I see in Paris if I only have one afternoon there?"
SHORT_PROMPT = 128  # positions: a written question's, or speech the released adapter shrinks to a few dozen rows
# What each engine's decode tok/s is measured over (see the module's docstring).
DECODE_TIMED = {"batched": "time inside the batch's decode steps",
                "unbatched": "the turn's token loop (decode_per_token)"}


def one_turn(engine, turn: dict, args, start: float, out: dict):
    """Answer one question (`respond`'s keywords), noting when the first audio, the last text and
    the end came."""
    session = engine.session(sampling=SAMPLING[args.sampling], max_new_tokens=args.max_new_tokens,
                             speak=not args.text_only)
    for event in session.respond(**turn):
        now = time.perf_counter() - start
        if isinstance(event, AudioChunk):
            out.setdefault("ttfa_s", now)
        elif isinstance(event, TextDelta):
            out["text_s"] = now  # a text delta leaves as soon as its token is decoded
        elif isinstance(event, TurnDone):
            out["tokens"], out["done_s"] = len(event.trace["tokens"]), now
            out["prompt"] = len(event.trace["prompt_ids"])
            out["decode_s"] = event.trace["timings_ms"]["decode_per_token"] * out["tokens"] / 1000


def counted(batcher, names: tuple[str, ...], before: list | None = None) -> list:
    """The batcher's counters now (less `before`)."""
    return [getattr(batcher, name) - (before[i] if before else 0) for i, name in enumerate(names)]


LOOPS = {"llm": "text_batcher", "echo": "echo_batcher", "vocoder": "vocoder_batcher"}  # name: engine attribute


def cpu_clocks(engine) -> dict[str, float]:
    """CPU seconds used so far by the process and by each of a batched engine's loop threads."""
    clocks = {"cores": time.process_time()}
    if engine.text_batcher:
        clocks |= {f"{name}_loop": time.clock_gettime(time.pthread_getcpuclockid(getattr(engine, attr).thread.ident))
                   for name, attr in LOOPS.items()}
    return clocks


def one_round(engine, conversations: int, turn: dict, args) -> dict:
    outs = [{} for _ in range(conversations)]
    text_batcher, vocoder_batcher = engine.text_batcher, engine.vocoder_batcher
    counters, vocoder_counters = ("steps", "rows_stepped", "step_seconds"), ("pushes", "calls", "units", "step_seconds")
    if text_batcher:
        before, vocoder_before = counted(text_batcher, counters), counted(vocoder_batcher, vocoder_counters)
    clocks, start = cpu_clocks(engine), time.perf_counter()
    threads = [threading.Thread(target=one_turn, args=(engine, turn, args, start, out)) for out in outs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    busy = {f"{name}_busy": (now - clocks[name]) / wall for name, now in cpu_clocks(engine).items()}
    tokens = sum(out["tokens"] for out in outs)
    ttfa = [out["ttfa_s"] * 1000 for out in outs if "ttfa_s" in out]
    vocoder = {"vocoder_ms_per_unit": None, "pushes_per_call": None}
    if text_batcher:
        steps, rows, seconds = counted(text_batcher, counters, before)
        pushes, calls, units, vocoder_s = counted(vocoder_batcher, vocoder_counters, vocoder_before)
        if calls:  # none for written answers
            vocoder = {"vocoder_ms_per_unit": vocoder_s * 1000 / max(units, 1), "pushes_per_call": pushes / calls}
    else:  # the unbatched engine: one row per step
        steps, rows, seconds = tokens, tokens, sum(out["decode_s"] for out in outs)
    return {"tokens": tokens, "text_tokens_per_s": tokens / max(out["text_s"] for out in outs),
            "decode_tokens_per_s": rows / seconds,
            "decode_timed": DECODE_TIMED["batched" if text_batcher else "unbatched"],
            "turn_tokens_per_s": tokens / max(out["done_s"] for out in outs),
            "ttfa_p50_ms": statistics.median(ttfa) if ttfa else None, "ttfa_p95_ms": percentile(ttfa, 0.95),
            "rows_per_step": rows / max(steps, 1),
            "prompt_positions": statistics.median(out["prompt"] for out in outs)} | vocoder | busy


def step_times(engine, widths: list[int], sampling, position: int, repeats: int = 20) -> list[dict]:
    """The batched decode step alone at each width, rows at `position` (slots hold no turns): the
    body and the head's selection with `sampling`, as TextBatcher.step runs them, less its
    bookkeeping and the tokens' trip to the host."""
    batcher, rows = engine.text_batcher, []
    weight = batcher.lm.lm_head.weight
    for width in widths:
        feed = torch.full((width,), batcher.pad_id, device=batcher.device)
        at = torch.full((width, 1), position, device=batcher.device)
        counters = torch.zeros(width, dtype=torch.int64, device=batcher.device)  # one per row, as sampled rows have

        def step():
            return head_select(batcher.body_step(feed, at), weight, sampling, counters)
        for _ in range(3):
            step()
        sync = torch.cuda.synchronize if feed.is_cuda else (lambda: None)
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        step_ms = (time.perf_counter() - started) / repeats * 1000
        rows.append({"position": position, "width": width, "step_ms": step_ms, "tokens_per_s": width * 1000 / step_ms})
    return rows


def asked(args) -> dict:
    """The question every conversation asks, as `respond` takes it: spoken, or written."""
    return {"text": WRITTEN_QUESTION} if args.written_question else {"audio": question(args.question_seconds)}


def median_round(engine, conversations: int, args) -> dict:
    rounds = [one_round(engine, conversations, asked(args), args) for _ in range(args.repeats)]
    # numbers: their median; labels and Nones: as every round has them
    return {"conversations": conversations} | {key: statistics.median(r[key] for r in rounds)
                                               if isinstance(rounds[0][key], (int, float)) else rounds[0][key]
                                               for key in rounds[0]}


def render(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    written = s.get("written_question")
    question_said = "a written question" if written else f"a {s['question_seconds']:g} s spoken question"
    rows = [[r["engine"], r["conversations"], r["tokens"], r["decode_tokens_per_s"], r.get("decode_timed"),
             r["text_tokens_per_s"], r["turn_tokens_per_s"], r["ttfa_p50_ms"], r["ttfa_p95_ms"], r["rows_per_step"],
             r.get("prompt_positions"),
             r["pushes_per_call"], r["vocoder_ms_per_unit"], r["cores_busy"], loops_busy(r)] for r in report["rounds"]]
    return "\n".join([
        f"# Batched engine, {s['size']} size, {env['created'][:10]}", "",
        f"{env['device']}, torch {env['torch']}, {env.get('torch_threads', '')} torch thread(s); random weights, "
        f"{s['sampling']} sampling, {question_said}, at most {s['max_new_tokens']} tokens, "
        f"{'written answers only (no speech made), ' if s.get('text_only') else ''}"
        f"{s.get('steps', 'captured')} steps; medians of {s['repeats']} rounds (`python bench/batch_engine.py --size "
        f"{s['size']} --device {s['device']} --sampling {s['sampling']}{' --eager' if s.get('steps') == 'eager' else ''}"
        f"{' --text-only' if s.get('text_only') else ''}{' --written-question' if written else ''}`).", "",
        *([] if report.get("complete", True) else  # reports before 2026-12-02 did not say
          ["**Incomplete**: the run stopped (a time limit or an error) before it had measured every round "
           "and the steps alone; the tables hold what it measured.", ""]),
        *table(["engine", "conversations", "tokens", "decode tok/s", "decode timed over", "text tok/s",
                "turn tok/s", "TTFA p50 ms", "TTFA p95 ms", "rows / LLM step", "prompt positions",
                "pushes / vocoder call", "vocoder ms / unit", "cores busy",
                "LLM / echo / vocoder loop busy %"], rows), "",
        "All conversations start at once. Decode tok/s: tokens per second over the time the next column names: "
        "for the batched engine the time inside its decode steps (while the speech of the turns runs beside "
        "them), for the unbatched one its whole token loop (the hand-offs to the speech path included), so "
        "those two are not like for like; text tok/s: every conversation's "
        "tokens over the time to the last token; turn tok/s: over the time to the last TurnDone (speech "
        "included); vocoder ms / unit: wall time of the batched vocoder's calls per unit vocoded; cores busy: the "
        "process's CPU time over the round's wall time; loop busy: each batch loop thread's CPU time over it.", "",
        f"The LLM's batched decode step alone (body and head selection, {s['sampling']} sampling), wall time per "
        "step, mid-answer in the rounds above and at a short prompt's position (every row reads its own KV "
        "cache up to its position):", "",
        *table(["position", "width", "step ms", "tok/s with every row busy"],
               [[r["position"], r["width"], r["step_ms"], r["tokens_per_s"]] for r in report["steps"]]), ""])


def loops_busy(row: dict) -> str:
    if row.get("llm_loop_busy") is None:
        return "-"
    return " / ".join(f"{100 * row[f'{name}_loop_busy']:.0f}" for name in LOOPS)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conversations", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy")
    parser.add_argument("--question-seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--eager", action="store_true", help="steps op by op, not captured (echox/capture.py)")
    parser.add_argument("--text-only", action="store_true", help="written answers only: no speech is made")
    parser.add_argument("--written-question", action="store_true",
                        help="ask a written question (a short prompt) instead of a spoken one")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    settings = {"size": args.size, "device": args.device, "max_new_tokens": args.max_new_tokens,
                "question_seconds": args.question_seconds, "repeats": args.repeats, "sampling": args.sampling,
                "steps": "eager" if args.eager else "captured", "text_only": args.text_only,
                "written_question": args.written_question}
    report = {"environment": environment(device), "settings": settings, "complete": False, "rounds": [], "steps": []}
    suffix = ("" if args.sampling == "greedy" else f"-{args.sampling}") + ("-eager" if args.eager else "") + \
        ("-text-only" if args.text_only else "") + ("-written-question" if args.written_question else "")

    def save():
        """Rewrite the report with what is measured so far: a run cut at a time limit (bench/gpu.sh)
        keeps its rounds, and says it was cut."""
        write_report(args.out, f"{device}-batch-{args.size}{suffix}", report, render(report))

    rounds = report["rounds"]
    with torch.inference_mode():
        unbatched = build_engine(args.size, args.device, graphs=not args.eager)
        one_round(unbatched, 1, asked(args), args)  # warm-up
        rounds.append({"engine": "unbatched"} | median_round(unbatched, 1, args))
        save()
        del unbatched
        engine = build_engine(args.size, args.device, graphs=not args.eager).batched(max(args.conversations))
        one_round(engine, max(args.conversations), asked(args), args)
        for conversations in args.conversations:
            rounds.append({"engine": f"batched ({max(args.conversations)})"} | median_round(engine, conversations, args))
            print(json.dumps(rounds[-1]), flush=True)
            save()
        mid_answer = int(rounds[-1]["prompt_positions"] + args.max_new_tokens / 2)
        report["steps"] = [row for position in (mid_answer, SHORT_PROMPT)
                           for row in step_times(engine, args.conversations, SAMPLING[args.sampling], position)]
    report["complete"] = True
    save()
    print(render(report))


if __name__ == "__main__":
    main()
