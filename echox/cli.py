"""The `echox` command. Every user mistake ends in one line on stderr and exit status 2.

Everything a command needs from the user (output paths writable, input audio readable and sane,
the question's text) is checked before any model is loaded, and outputs are written atomically
(outputs.py): a failed or interrupted run never leaves half a file or loses the user's own.
"""

import argparse
import contextlib
import errno
import math
import os
import sys
import warnings
from pathlib import Path

from .ctrl_c import ctrl_c_held, ctrl_c_stops_once
from .errors import EchoXError
from .outputs import atomic_file, check_output_file, check_output_folder, is_open_as
from .thread_limit import MAX_THREADS_PER_CORE, max_threads


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


STDIN, STDOUT = "/dev/stdin", "/dev/stdout"  # what `-` names (they are written into, never replaced: outputs.py)
RELEASED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocoder_config.json")


def _list_files(folder: Path) -> None:
    """Which of the released files a folder holds (the weights are listed by the index or glob)."""
    missing = [name for name in RELEASED_FILES if not (folder / name).is_file()]
    shards = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards if f.is_file())  # a dangling link is named when loading
    vocoders = sorted(folder.glob("g_*"))
    print(f"files          {len(shards)} safetensors file(s), {_human_bytes(size)}; "
          f"vocoder checkpoint: {', '.join(f.name for f in vocoders) or 'none'}")
    print(f"missing        {', '.join(missing) if missing else 'nothing'}")


def cmd_info(args) -> None:
    """What a model folder holds, what it lacks, its sizes and dtype."""
    from .checkpoint import open_model_folder, resolve_whisper
    from .config import require_folder
    folder = Path(args.model)
    require_folder(folder, "model folder")
    print(f"model folder   {folder}")
    _list_files(folder)
    model = open_model_folder(folder)  # the first problem that stops loading ends here, named
    cfg = model.config
    llm, body = cfg.llm, cfg.echo.body
    print(f"weights        {len(model.weights.keys())} tensors, stored as {model.weights.stored_dtype()}")
    print(f"LLM            {llm.num_layers} layers x {llm.hidden_size}, {llm.num_heads} heads / "
          f"{llm.num_kv_heads} kv, FFN {llm.intermediate_size}, vocab {llm.vocab_size}, "
          f"{'tied' if llm.tie_word_embeddings else 'separate'} output head")
    print(f"echo decoder   unit_model={cfg.unit_model!r}: {body.num_layers} layers x {body.hidden_size}, "
          f"{body.num_heads} heads / {body.num_kv_heads} kv, {cfg.echo.unit_vocab_size} unit tokens")
    try:
        print(f"{'whisper':<14} {resolve_whisper(model, None)}")
    except EchoXError as e:
        print(f"{'whisper':<14} MISSING: {e}")
    _describe_vocoder(model)


def _describe_vocoder(model) -> None:
    """Where the vocoder is, once its weights have loaded: a file named g_* is not yet a vocoder."""
    from .checkpoint import resolve_vocoder
    from .vocoder import find_vocoder_weights, load_vocoder
    try:
        folder = resolve_vocoder(model, None)
    except EchoXError as e:
        print(f"{'vocoder':<14} MISSING: {e}")
        return
    try:
        voice = load_vocoder(folder)
    except EchoXError as e:
        print(f"{'vocoder':<14} UNUSABLE: {e}")
        return
    print(f"{'vocoder':<14} {find_vocoder_weights(folder)} ({voice.cfg.num_embeddings} units, "
          f"{sum(p.numel() for p in voice.parameters()) / 1e6:.1f} M parameters)")


def cmd_tiny(args) -> None:
    """Write the tiny random checkpoint (tests and the demo use the same generator)."""
    from .tiny import MODEL_FOLDER, WHISPER_FOLDER, as_written, write_tiny_checkpoint
    out = Path(args.out)
    check_output_folder(out, "the tiny checkpoint")
    for folder in (out / MODEL_FOLDER, out / WHISPER_FOLDER):  # all checked before anything is replaced
        if not (folder.exists() or folder.is_symlink()):
            continue
        if not args.overwrite:
            raise EchoXError(f"{folder}: already exists (pass --overwrite to replace a tiny model echox wrote)")
        if not as_written(folder):  # a downloaded whisper-tiny has the same name
            raise EchoXError(f"{folder}: not a tiny model as echox wrote it (it holds other files, or its files "
                             "changed); --overwrite replaces only those: move it or choose another folder")
    model_dir = write_tiny_checkpoint(out, seed=args.seed)
    print(f"wrote {model_dir} (random weights: its text is gibberish and its speech is noise)")


def _sampling(args):
    from .sampling import GREEDY, SamplingParams
    if args.greedy:
        return GREEDY
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _keep_spoken_audio(chunks: list, output: Path, overwrite: bool):
    """After Ctrl-C or a full KV cache: write the audio spoken so far (if any) and say where it went."""
    import torch

    from .audio import write_wav
    print()
    if not chunks:
        print("echox: stopped before any audio was spoken; nothing written", file=sys.stderr)
        return
    wave = torch.cat(chunks)
    write_wav(output, wave, overwrite=overwrite)
    print(f"echox: stopped; the {wave.numel() / 16000:.2f} s of audio spoken so far are in {output}",
          file=sys.stderr)


def _show(text: str):
    """Stream a piece of the answer's text. Once stdout's reader has gone (`echox chat ... | head`),
    or its disk is full, the rest of it goes to os.devnull: the turn goes on, so its audio is still
    written."""
    try:
        print(text, end="", flush=True)
    except BrokenPipeError:
        _stdout_gone()
    except OSError as e:  # a log file on a full disk: say so once, on stderr
        _stdout_gone()
        print(f"\nechox: warning: the answer's text cannot be written to stdout ({e.strerror or e}); the turn goes on",
              file=sys.stderr)


def _flush_stdout():
    """Flush here, where a closed pipe is caught (in main), not at exit (a traceback). A closed stdout
    (`>&-`) is None: nothing to flush."""
    if sys.stdout is not None:
        sys.stdout.flush()


# A write without a file name that fails for want of room: stdout or stderr sent to a full disk
# (`echox info M > log.txt`); the files echox writes itself name theirs (outputs.py).
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _stdout_gone():
    """Point stdout at os.devnull. dup2 under Python's own stdout, not a new sys.stdout: the text still
    in its buffer would fail again when it is flushed at exit (a traceback from the interpreter)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _speak(session, audio, text: str | None, output: Path | None, overwrite: bool, trace: Path | None) -> dict:
    """Run one turn, streaming its text to the terminal; write the answer's audio to `output` (None:
    a text-only session's) and its trace. Ctrl-C keeps what was already spoken in `output`, then
    ends the command (exit 130)."""
    import json

    import torch

    from .audio import write_wav
    from .engine import AudioChunk, TextDelta, TurnDone
    from .errors import ConversationFull
    chunks, done, answered = [], None, False
    try:
        for event in session.respond(audio=audio, text=text):
            if isinstance(event, TextDelta):
                _show(event.text)
                answered = True
            elif isinstance(event, AudioChunk):
                chunks.append(event.samples)
            elif isinstance(event, TurnDone):
                done = event
    except (KeyboardInterrupt, ConversationFull) as stop:
        full = isinstance(stop, ConversationFull)
        if answered or not full:  # (a question that did not fit at all has said nothing)
            if output is not None:
                _keep_spoken_audio(chunks, output, overwrite)
            else:
                print()  # end the line of text, before the error line
        if full:  # a chat is one turn: the engine's advice (a reset) is not for it
            cures = ["shorten --text"] * bool(text) + ["lower --max-new-tokens"] * answered
            raise EchoXError(f"the {'answer' if answered else 'question'} outgrew the {session.decoder.max_len} "
                             f"positions of the conversation's KV cache: "
                             f"{' or '.join(cures) or 'shorten the spoken question'}") from None
        raise
    print()
    wave = torch.cat(chunks) if chunks else torch.zeros(0)
    if output is not None:
        write_wav(output, wave, overwrite=overwrite)
    if trace is not None:
        with atomic_file(trace) as temporary:
            temporary.write_text(json.dumps(done.trace, indent=1) + "\n")
    timings = done.trace["timings_ms"]
    seconds = wave.numel() / 16000
    tokens = len(done.trace["tokens"])
    first = timings["time_to_first_audio"]
    if output is not None:
        print(f"wrote {output}: {seconds:.2f} s of audio in {len(done.trace['segments'])} segments; "
              f"time to first audio {first:.0f} ms; " if first is not None else f"wrote {output}: no audio; ", end="")
    per_token = timings["decode_per_token"]
    rate = f" at {1000 / per_token:.1f} tokens/s" if tokens and per_token else ""
    print(f"{tokens} tokens{rate}" + (f"; real-time factor {timings['total'] / 1000 / seconds:.3f}" if seconds else ""))
    return done.trace


def _check_text_fits(model: Path, text: str, positions: int):
    """A --text longer than a conversation's KV cache, refused before the model loads (EchoX-8B takes
    minutes). A token holds at least one byte, so only a text of more bytes than positions can be
    too long, and only then is the tokenizer read to count its tokens: a lower bound of the prompt."""
    if len(text.encode()) <= positions or not (model / "tokenizer.json").is_file():
        return  # (a wrong --model is for the loader to explain, folder first)
    from .tokenizer import Tokenizer
    tokens = len(Tokenizer(model).encode(text))
    if tokens > positions:
        raise EchoXError(f"--text is {tokens} tokens long, more than the {positions} positions of the "
                         f"conversation's KV cache: shorten it")


@ctrl_c_stops_once()
def cmd_chat(args) -> None:
    """One spoken (or written) turn with a real or tiny checkpoint."""
    with ctrl_c_held():  # torch's import cannot take a KeyboardInterrupt (ctrl_c.py)
        from . import engine as echox_engine
        from .audio import speech_input
        from .tokenizer import user_text
    if (args.output is None) != args.text_only:
        raise EchoXError("--text-only writes no audio: drop --output" if args.text_only else
                         "give --output OUT.wav for the answer's audio, or --text-only for a written answer alone")
    output = None if args.text_only else Path(args.output)
    trace = Path(args.trace) if args.trace else None
    if output is not None:
        check_output_file(output, args.overwrite, "--output")
    if trace is not None:
        if output is not None and trace.resolve() == output.resolve():
            raise EchoXError(f"{trace}: --trace and --output name the same file; give the trace its own path")
        check_output_file(trace, args.overwrite, "--trace")
    sampling = _sampling(args)  # first: the only check of the arguments' values that needs no file
    text = user_text(args.text, "--text")
    if args.input is None and not text:
        raise EchoXError("give --input IN.wav, --text STR, or both")
    speech = None if args.input is None else speech_input(Path(args.input))  # read and checked before loading
    _check_text_fits(Path(args.model), text, echox_engine.DEFAULT_MAX_LEN)
    engine = echox_engine.load(args.model, whisper=args.whisper, vocoder=args.vocoder, device=args.device,
                               threads=args.threads,
                               dtype=args.dtype, graphs=not args.eager)
    print(f"whisper: {engine.whisper_dir}\nvocoder: {engine.vocoder_dir}", file=sys.stderr)
    from .segmenter import LOW_LATENCY_SEGMENTER, RELEASED_SEGMENTER
    segmenter = LOW_LATENCY_SEGMENTER if args.low_latency else RELEASED_SEGMENTER
    session = engine.session(sampling=sampling, segmenter=segmenter, max_new_tokens=args.max_new_tokens,
                             max_units=args.max_units, speak=not args.text_only)
    _speak(session, speech, text, output, args.overwrite, trace)


def demo_question(seconds: float = 3.0):
    """A deterministic speech-like signal (a voiced tone with moving formants), so the demo needs
    no text-to-speech program; the tiny model is random, so any input serves to show the pipeline."""
    import torch
    t = torch.arange(int(seconds * 16000)) / 16000
    pitch = 120 + 30 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(pitch, 0) / 16000
    voice = sum(torch.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - torch.cos(2 * torch.pi * 2.5 * t)).clamp(min=0)
    return (0.1 * voice * envelope).float()


def demo_model_dir() -> Path:
    """The tiny random checkpoint of `echox demo` (and `serve --demo`), built in ECHOX_CACHE on first
    use, and again if an earlier build was left incomplete."""
    import os

    from .tiny import LAYOUT_VERSION, is_complete, write_tiny_checkpoint
    # An empty ECHOX_CACHE (`ECHOX_CACHE= echox demo`, the shell's way to unset it) is unset, not ".".
    cache = Path(os.environ.get("ECHOX_CACHE") or Path.home() / ".cache" / "echox") / f"tiny-v{LAYOUT_VERSION}"
    if not is_complete(cache):
        check_output_folder(cache, "the demo's model cache (ECHOX_CACHE)")
        write_tiny_checkpoint(cache)
    return cache / "EchoX-tiny"


@ctrl_c_stops_once()
def cmd_demo(args) -> None:
    """The whole pipeline end to end on the tiny random checkpoint, on the CPU."""
    with ctrl_c_held():  # torch's import cannot take a KeyboardInterrupt (ctrl_c.py)
        from . import engine as echox_engine
        from .sampling import GREEDY
    output = Path(args.output)
    check_output_file(output, args.overwrite, "--output")
    model_dir = demo_model_dir()
    print(f"tiny random checkpoint: {model_dir}\n"
          "Its weights are random: the text below is gibberish and the speech is noise. The demo shows "
          "the pipeline and its timings.\n")
    engine = echox_engine.load(model_dir, device="cpu", threads=args.threads, graphs=not args.eager)
    session = engine.session(sampling=GREEDY, max_new_tokens=args.max_new_tokens, max_units=args.max_units)
    trace = _speak(session, demo_question(), None, output, True, None)
    print("latency breakdown (ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in trace["timings_ms"].items() if v is not None))


def cmd_convert(args) -> None:
    """fairseq vocoder checkpoint (g_* + vocoder_config.json) -> folded safetensors."""
    from .vocoder import convert_fairseq_vocoder
    out = Path(args.output)
    check_output_file(out, args.overwrite, "the converted vocoder")
    convert_fairseq_vocoder(Path(args.vocoder), out, overwrite=args.overwrite)
    print(f"wrote {out}")


# Measured on a 2-core machine (bench/speech_path.py --threads 1 2): a turn runs three busy threads (LLM, echo
# decoder, vocoder), and one intra-op thread each beats two, which only fight over the cores.
DEFAULT_THREADS = 1


def whole_number(what: str, least: int = 1, most: int | None = None):
    """An argparse type for a count: a whole number >= `least` (and <= `most`), refused at parse time
    (before a model loads)."""
    def count(value: str) -> int:
        if not value.isdigit() or int(value) < least:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number >= {least}, got {value!r}")
        if most is not None and int(value) > most:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number from {least} to {most}, got {value!r}")
        return int(value)
    return count


def file_argument(dash: str | None = None):
    """An argparse type for a file path: not empty (it would name the current folder, or be taken as
    no file at all); `-` is `dash`, stdin or stdout, as Unix tools read it (`--output - | aplay -`)."""
    def parse(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError("an empty path; give a file name")
        return dash if value == "-" and dash else value
    return parse


def port_number(value: str) -> int:
    """An argparse type for a TCP port to listen on: 0 (any free one) .. 65535."""
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number 0..65535 (0: any free one), got {value!r}")
    return int(value)


def _number(value: str) -> float:
    """The number `value` spells, or NaN (which every range check refuses)."""
    try:
        return float(value)
    except ValueError:
        return math.nan


def positive_number(what: str):
    """An argparse type for a duration or a rate: a finite number > 0."""
    def number(value: str) -> float:
        parsed = _number(value)
        if not (0 < parsed < math.inf):
            raise argparse.ArgumentTypeError(f"{what} must be a finite number > 0, got {value!r}")
        return parsed
    return number


def probability(what: str):
    """An argparse type for a rate such as dropout: a number in [0, 1)."""
    def rate(value: str) -> float:
        parsed = _number(value)
        if not 0 <= parsed < 1:
            raise argparse.ArgumentTypeError(f"{what} must be a number in [0, 1), got {value!r}")
        return parsed
    return rate


def add_limit_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, max_units: int, units_help: str,
                        tokens_help: str | None = None):
    """--max-new-tokens and --max-units, as demo, chat and serve take them."""
    parser.add_argument("--max-new-tokens", type=whole_number("max-new-tokens"), default=max_new_tokens,
                        help=tokens_help)
    parser.add_argument("--max-units", type=whole_number("max-units"), default=max_units, help=units_help)


def add_threads_argument(parser: argparse.ArgumentParser):
    most = max_threads()
    parser.add_argument("--threads", type=whole_number("threads", most=most), default=DEFAULT_THREADS,
                        help=f"torch intra-op threads on the CPU of each of a turn's LLM, echo-decoder and "
                             f"vocoder threads (default {DEFAULT_THREADS}: fastest turn measured on 2 cores; at most "
                             f"{most}, {MAX_THREADS_PER_CORE} per core); the speech encoder and prefill, which run "
                             f"before them, use every core")


def add_eager_argument(parser: argparse.ArgumentParser, *aliases: str):
    parser.add_argument("--eager", *aliases, action="store_true",
                        help="run decode steps (and on a GPU vocoder pushes) op by op, not as CUDA graphs (GPU) "
                             "or TorchScript traces (CPU): slower, the same results (debugging)")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as every other user mistake: `echox: error: ...` in one line, exit status 2
    (argparse's own print a usage block first; `--help` still shows it). Subcommands' parsers are
    made by this class too (add_subparsers uses the parent's)."""

    def error(self, message: str):
        command = self.prog.removeprefix("echox").strip()  # "chat" for `echox chat`; "" for `echox` itself
        self.exit(2, f"echox: error: {command + ': ' if command else ''}{message}\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but arguments a subcommand does not take are named with the subcommand, as
        its other errors are (argparse leaves them to the top parser, which knows no subcommand)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            self.exit(2, f"echox: error: {command + ': ' if command else ''}unrecognized arguments: "
                         f"{' '.join(extra)}\n")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="echox", description="EchoX speech-to-speech engine")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a model folder")
    info.add_argument("model", help="EchoX model folder")
    info.set_defaults(run=cmd_info)
    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint in the released layout")
    tiny.add_argument("out", help="folder to write EchoX-tiny/ and whisper-tiny/ in")
    tiny.add_argument("--seed", type=whole_number("seed", least=0, most=2**64 - 1), default=0)  # torch's range
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(run=cmd_tiny)

    demo = sub.add_parser("demo", help="run one spoken turn on the tiny random model (CPU)")
    demo.add_argument("--output", type=file_argument(STDOUT), default="demo.wav", help="answer audio (`-`: stdout)")
    demo.add_argument("--overwrite", action="store_true")
    add_limit_arguments(demo, 64, 200, "unit tokens per segment")
    add_threads_argument(demo)
    add_eager_argument(demo)
    demo.set_defaults(run=cmd_demo)

    chat = sub.add_parser("chat", help="answer one spoken or written turn")
    chat.add_argument("--model", required=True, help="EchoX model folder")
    chat.add_argument("--whisper", help="Whisper encoder folder (default: from config.json audio_tower)")
    chat.add_argument("--vocoder", help="vocoder folder (default: the model folder, then ../vocoder)")
    chat.add_argument("--input", type=file_argument(STDIN), help="spoken question (WAV; FLAC/OGG/MP3 with soundfile; "
                      "`-`: stdin)")
    chat.add_argument("--text", help="written question, or text that goes with the speech")
    chat.add_argument("--output", type=file_argument(STDOUT),
                      help="answer audio (16 kHz WAV; `-`: stdout); required unless --text-only")
    chat.add_argument("--text-only", action="store_true",
                      help="a written answer alone: no speech is made (no echo decoder or vocoder work)")
    chat.add_argument("--overwrite", action="store_true")
    chat.add_argument("--greedy", action="store_true")
    chat.add_argument("--temperature", type=float, default=0.2)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--seed", type=int, default=0)
    add_limit_arguments(chat, 512, 2048, "unit tokens per segment (released: 2048)")
    chat.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_threads_argument(chat)
    chat.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    chat.add_argument("--trace", type=file_argument(STDOUT), help="write a JSON trace of the turn here (`-`: stdout)")
    chat.add_argument("--low-latency", action="store_true",
                      help="cut the first segment after 8 tokens (opt-in; the released policy waits for 20-50)")
    add_eager_argument(chat, "--no-cuda-graphs")
    chat.set_defaults(run=cmd_chat)

    convert = sub.add_parser("convert", help="fairseq vocoder (g_* + vocoder_config.json) -> safetensors")
    convert.add_argument("vocoder", help="folder holding g_* and vocoder_config.json")
    convert.add_argument("output", help="the .safetensors file to write")
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(run=cmd_convert)

    from .train.cli import add_train_command  # argparse only: training imports torch when it runs
    add_train_command(sub)
    from .serve.cli import add_serve_command  # argparse only: the server imports aiohttp when it runs
    add_serve_command(sub)
    from .serve.ray_cli import add_serve_ray_command  # Ray is imported when it runs
    add_serve_ray_command(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings meant for the user (e.g. audio cut to 30 s) as one plain line, without source lines."""
    print(f"echox: warning: {message}", file=sys.stderr)


def _text_off_the_output(*outputs: str | None):
    """With an output going to stdout (`--output - | aplay -`, `--trace - | jq`), what the command
    prints (the streamed text, the summary) goes to stderr, where it cannot corrupt the WAV or JSON."""
    if any(output and is_open_as(Path(output), 1) for output in outputs):
        return contextlib.redirect_stdout(sys.stderr)
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        with _text_off_the_output(getattr(args, "output", None), getattr(args, "trace", None)):
            args.run(args)
        _flush_stdout()
    except EchoXError as e:
        print(f"echox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echox: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # what reads stdout has gone (`echox info ... | head -1`): nobody to tell
        _stdout_gone()
        return 141  # as a command killed by SIGPIPE (which Python ignores)
    except OSError as e:
        if e.errno not in FULL or e.filename is not None:
            raise
        _stdout_gone()
        print(f"echox: error: cannot write what it prints ({e.strerror})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
