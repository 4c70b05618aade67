"""The `echox serve` subcommand, registered by echox/cli.py; heavy imports wait until it runs."""

import argparse


def add_serve_command(sub: argparse._SubParsersAction):
    from ..cli import (  # the same as chat and demo
        add_eager_argument, add_limit_arguments, add_threads_argument, whole_number, port_number, positive_number)
    serve = sub.add_parser("serve", help="serve realtime spoken conversations (OpenAI Realtime API subset)")
    model = serve.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="EchoX model folder")
    model.add_argument("--demo", action="store_true", help="serve the built-in tiny random model (CPU)")
    serve.add_argument("--whisper", help="Whisper encoder folder (default: from config.json audio_tower)")
    serve.add_argument("--vocoder", help="vocoder folder (default: the model folder, then ../vocoder)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8998, help="0 picks a free port (printed at start)")
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--temperature", type=float, default=0.2, help="default sampling (session.update changes it)")
    serve.add_argument("--top-p", type=float, default=0.9)
    add_limit_arguments(serve, 512, 2048, "unit tokens per segment (released: 2048)",
                        tokens_help="default max_output_tokens of a response")
    serve.add_argument("--low-latency", action="store_true", help="cut the first segment after 8 tokens")
    serve.add_argument("--max-connections", type=whole_number("max-connections"), default=8)
    serve.add_argument("--max-batch", type=whole_number("max-batch"), default=1,
                       help="turns answered at once, as rows of batched LLM and echo-decoder steps; each holds a "
                            "KV slot of 4096 positions (1: no batching, turns take turns)")
    serve.add_argument("--max-buffer-seconds", type=positive_number("max-buffer-seconds"), default=30.0,
                       help="input audio buffer limit per connection (24 kHz pcm16)")
    serve.add_argument("--idle-timeout", type=positive_number("idle-timeout"), default=300.0,
                       help="seconds without client events")
    add_threads_argument(serve)
    add_eager_argument(serve)
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args):
    import asyncio

    from .. import engine as echox_engine
    from ..cli import demo_model_dir
    from ..segmenter import LOW_LATENCY_SEGMENTER, RELEASED_SEGMENTER
    from .ports import check_listenable
    from .server import Limits, Server, serve_forever
    check_demo_device(args)
    defaults = session_defaults(args)
    if args.max_batch > args.max_connections:  # each connection has at most one turn in flight
        print(f"echox serve: --max-batch {args.max_batch} is more than --max-connections {args.max_connections} "
              f"can use; batching {args.max_connections} turns", flush=True)
        args.max_batch = args.max_connections
    check_listenable(args.host, args.port)
    model = demo_model_dir() if args.demo else args.model
    engine = echox_engine.load(model, whisper=args.whisper, vocoder=args.vocoder,
                               device=args.device, dtype=args.dtype, threads=args.threads,
                               graphs=not args.eager, max_batch=args.max_batch if args.max_batch > 1 else None)
    limits = Limits(max_connections=args.max_connections, max_buffer_bytes=int(args.max_buffer_seconds * 48000),
                    idle_timeout_s=args.idle_timeout)
    session_options = {"max_units": args.max_units,
                       "segmenter": LOW_LATENCY_SEGMENTER if args.low_latency else RELEASED_SEGMENTER}
    asyncio.run(serve_forever(Server(engine, defaults, limits, session_options), args.host, args.port))


def session_defaults(args):
    """Every session's starting config, from the command line; its sampling values are checked now,
    with the sampler's own message (serve-ray checks its replicas' before Ray starts)."""
    from .session_config import SessionConfig
    defaults = SessionConfig(temperature=args.temperature, top_p=args.top_p, max_output_tokens=args.max_new_tokens)
    defaults.sampling()
    return defaults


def check_demo_device(args):
    """--demo is the tiny model on the CPU: with --device cuda it ran on the CPU without a word."""
    if args.demo and args.device == "cuda":
        from ..errors import EchoXError
        raise EchoXError("--demo serves the tiny random model on the CPU: drop --device cuda, or give --model")
