"""The `echox` command. Every user mistake ends in one line on stderr and exit status 2."""

import argparse
import sys
from pathlib import Path

from .errors import EchoXError


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args) -> None:
    """What a model folder holds, what it lacks, its sizes and dtype."""
    from .checkpoint import open_model_folder, resolve_vocoder, resolve_whisper
    model = open_model_folder(args.model)
    cfg = model.config
    llm, body = cfg.llm, cfg.echo.body
    size = sum(f.stat().st_size for f in model.path.glob("*.safetensors"))
    print(f"model folder   {model.path}")
    print(f"weights        {len(model.weights.keys())} tensors, {_human_bytes(size)}, stored as "
          f"{model.weights.stored_dtype()}")
    print(f"LLM            {llm.num_layers} layers x {llm.hidden_size}, {llm.num_heads} heads / "
          f"{llm.num_kv_heads} kv, FFN {llm.intermediate_size}, vocab {llm.vocab_size}, "
          f"{'tied' if llm.tie_word_embeddings else 'separate'} output head")
    print(f"echo decoder   unit_model={cfg.unit_model!r}: {body.num_layers} layers x {body.hidden_size}, "
          f"{body.num_heads} heads / {body.num_kv_heads} kv, {cfg.echo.unit_vocab_size} unit tokens")
    for name, resolve in (("whisper", resolve_whisper), ("vocoder", resolve_vocoder)):
        try:
            print(f"{name:<14} {resolve(model, None)}")
        except EchoXError as e:
            print(f"{name:<14} MISSING: {e}")


def cmd_tiny(args) -> None:
    """Write the tiny random checkpoint (tests and the demo use the same generator)."""
    from .tiny import write_tiny_checkpoint
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise EchoXError(f"{out}: exists and is not empty (pass --overwrite to replace its tiny model)")
    model_dir = write_tiny_checkpoint(out, seed=args.seed)
    print(f"wrote {model_dir} (random weights: its text is gibberish and its speech is noise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echox", description="EchoX speech-to-speech engine")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a model folder")
    info.add_argument("model", help="EchoX model folder")
    info.set_defaults(run=cmd_info)
    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint in the released layout")
    tiny.add_argument("out", help="folder to create")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(run=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EchoXError as e:
        print(f"echox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echox: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
