"""End-to-end latency of EchoX with random weights, one JSON object per size.

For each size (GPU: 8b and 3b; CPU: tiny and mid) this measures, after a warm-up, the median
over `--repeats` runs of:
  encoder_ms, adapter_ms, prefill_ms   from the trace of a whole speech turn (5 s question);
  llm_ms_per_token                     TextDecoder alone, greedy, as the engine drives it (one
                                       read-back per token), and on a known GPU the share of the
                                       HBM roofline: bytes a step must read (LLM weights except
                                       the embedding table, plus the KV cache in use) / time;
  echo_ms_per_unit                     echo decoder alone: (time for M units - time for 1) / (M - 1);
  vocoder_x_realtime                   streaming vocoder, units pushed 2 at a time, audio s / compute s
                                       (on a GPU as the engine runs it, pushes as CUDA graphs, and
                                       vocoder_x_realtime_eager without them);
  ttfa[policy]                         time to first audio of a whole turn, released and low-latency
                                       segmentation, greedy decoding.
Random weights neither stop nor segment like the trained model: a turn runs to max_new_tokens,
the speech adapter keeps almost every frame (random CTC labels rarely repeat), and segments are
cut wherever the random scores peak. So each TTFA comes with what it depended on: the prompt
length; which segment first made sound, its token count, how many tokens the LLM had written
when it was cut and whether the segmenter or the end of the answer cut it; and the units the
vocoder took before its first chunk. Nothing is forced.
"""

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from echox.engine import Engine, Session, resolve_device
from echox.generate import TextDecoder
from echox.sampling import GREEDY
from echox.segmenter import LOW_LATENCY_SEGMENTER, RELEASED_SEGMENTER
from echox.streaming_vocoder import StreamingVocoder, lookahead_units
from echox.tokenizer import Turn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_engine import build_engine  # noqa: E402  (a sibling script, not a package)

PUSH_UNITS = inspect.signature(Session).parameters["push_units"].default  # a session's steady vocoder push

SAMPLE_RATE = 16000
POLICIES = {"released": RELEASED_SEGMENTER, "low_latency": LOW_LATENCY_SEGMENTER}
# Peak HBM bandwidth in bytes/s by device-name fragment, most specific first.
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12)]


class Settings:
    def __init__(self, repeats: int, max_new_tokens: int = 96, max_units: int = 128, question_seconds: float = 5.0,
                 echo_units: int = 64, vocoder_units: int = 250):
        # 96 tokens leave the released policy (>= 50 tokens + 5 of look-ahead) room to cut a segment.
        self.repeats, self.max_new_tokens, self.max_units = repeats, max_new_tokens, max_units
        self.question_seconds, self.echo_units, self.vocoder_units = question_seconds, echo_units, vocoder_units

    def as_dict(self) -> dict:
        return dict(vars(self))


def synchronizer(device: torch.device):
    """Waits for queued GPU work, so host clocks count it where it ran; a no-op on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for fragment, bandwidth in PEAK_BANDWIDTH if fragment in name), None)


def question(seconds: float) -> torch.Tensor:
    """A deterministic stand-in for speech: a gliding tone with noise, [n] at 16 kHz."""
    gen = torch.Generator().manual_seed(1)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return 0.3 * torch.sin(2 * torch.pi * (200 + 100 * t) * t) + 0.02 * torch.randn(t.shape, generator=gen)


# ---- whole turns: encoder, adapter, prefill, time to first audio -------------------------------

def units_before_first_chunk(engine: Engine, unit_tokens: list[int]) -> tuple[int, bool]:
    """Replay a segment's unit tokens into a fresh stream as the engine pushes them (one token's
    units at a time): (units pushed before the first samples came out, whether only the flush
    at the segment's end released them, the segment being shorter than the look-ahead)."""
    voice, pushed = StreamingVocoder(engine.vocoder), 0
    for token in unit_tokens:
        units = engine.echo.units_of([token])
        if not units:
            continue
        pushed += len(units)
        if voice.push(torch.tensor(units)).numel():
            return pushed, False
    return pushed, True


def run_turn(session, audio: torch.Tensor) -> dict:
    """One speech turn as a fresh conversation on the session's warm buffers; returns its trace."""
    session.reset()  # a new conversation on the warm KV cache and captured decode graph
    return [event for event in session.respond(audio=audio)][-1].trace


def first_audio_segment(engine: Engine, trace: dict) -> dict:
    """What the first audio waited for: the first segment that made any sound (an earlier one can
    be silent when the echo decoder ends it at once) and the units its first chunk needed."""
    tokens, segments = trace["tokens"], trace["segments"]
    index = next((i for i, segment in enumerate(segments) if segment["samples"]), None)
    if index is None:
        return {"audio_segment": None}
    segment = segments[index]
    units, at_flush = units_before_first_chunk(engine, segment["unit_tokens"])
    return {"audio_segment": index,
            "audio_segment_tokens": segment["end"] - segment["start"],
            "tokens_before_audio_segment_cut": segment["end"],
            "audio_segment_cut_by": "segmenter" if segment["end"] < len(tokens) else "end of answer",
            "audio_segment_unit_tokens": len(segment["unit_tokens"]),
            "units_before_first_chunk": units, "first_chunk_at_flush": at_flush}


def measure_turns(engine: Engine, settings: Settings) -> dict:
    audio = question(settings.question_seconds)
    out = {}
    for policy_name, policy in POLICIES.items():
        session = engine.session(sampling=GREEDY, segmenter=policy, max_new_tokens=settings.max_new_tokens,
                                 max_units=settings.max_units)
        cold = run_turn(session, audio)  # warm-up; on CUDA its TTFA includes capturing the decode graphs
        traces = [run_turn(session, audio) for _ in range(settings.repeats)]
        ttfa = [t["timings_ms"]["time_to_first_audio"] for t in traces]
        out[policy_name] = {
            "ms": statistics.median(ttfa) if None not in ttfa else None,
            "cold_ms": cold["timings_ms"]["time_to_first_audio"],
            "answer_tokens": len(traces[-1]["tokens"]),
            "segments": len(traces[-1]["segments"]),
            **first_audio_segment(engine, traces[-1]),  # greedy: every timed turn decodes the same
            "timings_ms": {key: statistics.median(t["timings_ms"][key] for t in traces)
                           for key in ("encoder", "adapter", "prefill", "decode_per_token")},
            "prompt_length": len(traces[-1]["prompt_ids"]),
            "speech_frames": len(traces[-1]["speech_frames"]),
        }
    return out


# ---- the LLM decode step alone ------------------------------------------------------------------

def llm_bytes_per_step(engine: Engine, context: float) -> float:
    """Bytes one decode step must read: every LLM weight but the embedding table (one row of it
    is read; with tied weights the table is the output head and is read whole), plus the keys
    and values of `context` cached positions."""
    lm, cfg = engine.lm, engine.lm.cfg
    weights = sum(p.numel() * p.element_size() for p in lm.body.parameters())
    weights += lm.lm_head.weight.numel() * lm.lm_head.weight.element_size()
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * torch.finfo(engine.dtype).bits / 8
    return weights + kv


def measure_llm_decode(engine: Engine, settings: Settings, prompt_length: int) -> dict:
    """Greedy decode of max_new_tokens after a text prompt as long as the speech turn's prompt."""
    tok = engine.tokenizer
    base = len(tok.prompt([Turn("user", "a")]))
    slots = tok.prompt([Turn("user", "a" * max(prompt_length - base + 1, 1))])  # one token per byte
    decoder = TextDecoder(engine.lm, tok.pad, tok.eot, tok.period, len(slots) + settings.max_new_tokens + 1)
    clock_sync = synchronizer(engine.device)

    def decode_once() -> tuple[float, int]:
        hidden = decoder.prefill(slots, {})  # the cache already holds `slots`: re-reads the last one
        clock_sync()
        started = time.perf_counter()
        count = sum(1 for _ in decoder.decode(hidden, len(slots), GREEDY, settings.max_new_tokens))
        clock_sync()
        return (time.perf_counter() - started) * 1000, count

    with torch.inference_mode():
        decoder.prefill(slots, {})
        decode_once()  # warm-up: captures the graph on CUDA
        runs = [decode_once() for _ in range(settings.repeats)]
    tokens = runs[-1][1]
    ms_per_token = statistics.median(ms / max(count, 1) for ms, count in runs)
    context = len(slots) + (tokens + 1) / 2  # mean cached length over the measured steps
    bytes_per_step = llm_bytes_per_step(engine, context)
    peak = peak_bandwidth(engine.device)
    return {"llm_ms_per_token": ms_per_token, "llm_tokens_timed": tokens, "llm_context_mean": context,
            "llm_bytes_per_step": bytes_per_step,
            "llm_hbm_roofline_pct": None if peak is None else 100 * bytes_per_step / (ms_per_token / 1000) / peak,
            "peak_bandwidth_bytes_per_s": peak}


# ---- echo decoder and vocoder alone --------------------------------------------------------------

def measure_echo(engine: Engine, settings: Settings) -> dict:
    """Per-unit cost of the echo decoder's decode loop, the prompt's prefill taken out."""
    gen = torch.Generator(engine.device).manual_seed(2)
    segment = torch.randn(20, engine.lm.cfg.hidden_size, generator=gen, device=engine.device, dtype=engine.dtype)
    clock_sync = synchronizer(engine.device)

    def timed(max_units: int) -> tuple[float, int]:
        clock_sync()
        started = time.perf_counter()
        count = sum(1 for _ in engine.echo.generate(segment, max_units=max_units))
        clock_sync()
        return (time.perf_counter() - started) * 1000, count

    with torch.inference_mode():
        timed(settings.echo_units)  # warm-up: captures the step graph on CUDA
        first = [timed(1) for _ in range(settings.repeats)]
        many = [timed(settings.echo_units) for _ in range(settings.repeats)]
    prefill_ms = statistics.median(ms for ms, _ in first)
    units = many[-1][1]
    per_unit = (statistics.median(ms for ms, _ in many) - prefill_ms) / (units - 1) if units > 1 else None
    return {"echo_ms_per_unit": per_unit, "echo_prefill_ms": prefill_ms, "echo_units_timed": units}


def measure_vocoder(engine: Engine, settings: Settings) -> dict:
    vocoder = engine.vocoder
    gen = torch.Generator().manual_seed(3)
    units = torch.randint(0, vocoder.cfg.num_embeddings, (settings.vocoder_units,), generator=gen)
    clock_sync = synchronizer(engine.device)

    def stream_all(voice: StreamingVocoder) -> tuple[float, int]:
        samples = 0
        clock_sync()
        started = time.perf_counter()
        # As the engine pushes (speech_pipeline.py): look-ahead + 1 units, then PUSH_UNITS at a time,
        # the rest with the flush. (Until 2026-12-02 this pushed 2 units at a time, one unit token's
        # worth, which the engine stopped doing on 2026-11-25: each push has a fixed cost.)
        first = voice.lookahead_units + 1
        pieces = [units[:first], *units[first:].split(PUSH_UNITS)]
        for piece in pieces[:-1]:
            samples += voice.push(piece).numel()
        samples += voice.flush(pieces[-1]).numel()
        clock_sync()
        return time.perf_counter() - started, samples

    def first_chunk_after() -> int | None:
        voice = StreamingVocoder(vocoder)
        return next((n for n in range(1, len(units) + 1) if voice.push(units[n - 1:n]).numel()), None)

    def x_realtime(voice) -> tuple[float, float]:
        """(audio s / compute s, audio s) of `voice()` streams, median of the repeats."""
        with torch.inference_mode():
            stream_all(voice())
            runs = [stream_all(voice()) for _ in range(settings.repeats)]
        audio_seconds = runs[-1][1] / vocoder.cfg.sample_rate
        return audio_seconds / statistics.median(s for s, _ in runs), audio_seconds

    speed, audio_seconds = x_realtime(engine.voice)
    with torch.inference_mode():
        first = first_chunk_after()
    eager = {}
    if engine.steady_push is not None:  # the same pushes, uncaptured
        eager["vocoder_x_realtime_eager"] = x_realtime(lambda: StreamingVocoder(vocoder, engine.speaker))[0]
    return {"vocoder_x_realtime": speed, **eager, "vocoder_audio_s": audio_seconds,
            "vocoder_units_before_first_chunk": first, "vocoder_lookahead_units": lookahead_units(vocoder)}


def measure(engine: Engine, size: str, settings: Settings) -> dict:
    """Every e2e number for one engine."""
    turns = measure_turns(engine, settings)
    released = turns["released"]
    device = engine.device
    return {
        "size": size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "settings": settings.as_dict(),
        "prompt_length": released["prompt_length"],
        "speech_frames": released["speech_frames"],
        "encoder_ms": released["timings_ms"]["encoder"],
        "adapter_ms": released["timings_ms"]["adapter"],
        "prefill_ms": released["timings_ms"]["prefill"],
        "turn_decode_ms_per_token": released["timings_ms"]["decode_per_token"],
        **measure_llm_decode(engine, settings, released["prompt_length"]),
        **measure_echo(engine, settings),
        **measure_vocoder(engine, settings),
        "ttfa": turns,
    }


def default_sizes(device: torch.device) -> list[str]:
    return ["8b", "3b"] if device.type == "cuda" else ["tiny", "mid"]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", help="tiny, mid, 3b, 8b (default: 8b 3b on CUDA, tiny mid on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also append each JSON object as a line to this file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    for size in args.sizes or default_sizes(device):
        engine = build_engine(size, device)
        result = json.dumps(measure(engine, size, Settings(args.repeats)))
        print(result, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(result + "\n")
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
