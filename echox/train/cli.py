"""`echox train stage1|stage2|stage3|demo`: the argument parser, nothing heavier.

Training code (torch, the model) is imported only when a training command runs, so that
`echox --help` stays fast.
"""

import argparse
from pathlib import Path

# Seeds enter 64-bit seeds after scaling (loop.step_seed): bounded here, so a large one stops while parsing.
MAX_SEED = 2**32 - 1


def _stage_options(parser: argparse.ArgumentParser, lora: bool):
    from ..cli import positive_number, whole_number  # checked while parsing, before any data or model loads
    parser.add_argument("--manifest", required=True, help="JSONL manifest, one conversation turn a line")
    parser.add_argument("--model", required=True, help="EchoX model folder to start from")
    parser.add_argument("--out", required=True, help="folder for model/, metrics.jsonl and train_state.pt")
    parser.add_argument("--whisper", help="Whisper encoder folder (default: from config.json audio_tower)")
    parser.add_argument("--steps", type=whole_number("steps"), default=200)
    parser.add_argument("--batch-size", type=whole_number("batch-size"), default=4,
                        help="global batch (split over torchrun processes)")
    parser.add_argument("--lr", type=positive_number("lr"), default=1e-3)
    parser.add_argument("--seed", type=whole_number("seed", least=0, most=MAX_SEED), default=0)
    parser.add_argument("--log-every", type=whole_number("log-every"), default=1,
                        help="steps between metrics.jsonl lines")
    parser.add_argument("--save-every", type=whole_number("save-every", least=0), default=0,
                        help="steps between resumable states (0: at the end)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda trains in bfloat16 autocast, one GPU per torchrun process")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute decoder layers in the backward pass (less memory, more time)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model")
    if lora:
        parser.add_argument("--lora-rank", type=whole_number("lora-rank"), default=8)
        parser.add_argument("--lora-alpha", type=positive_number("lora-alpha"), default=16.0)
        parser.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                            help="comma-separated LLM projections to adapt (q k v o gate up down)")


def _run_stage(args):
    from .stages import StageOptions, run_stage
    run_stage(args.stage, StageOptions.from_args(args))


def _run_demo(args):
    from .demo import run_demo
    run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite, seed=args.seed)


def add_train_command(sub):
    """Register `echox train ...` on the top-level subparsers."""
    from ..cli import probability, whole_number  # echox/cli.py imports this module
    train = sub.add_parser("train", help="echo training: stage1 | stage2 | stage3 | demo")
    stages = train.add_subparsers(dest="stage", required=True)
    descriptions = {
        "stage1": "speech -> text: CE + 0.3 CTC; adapter trained, LLM through LoRA, Whisper frozen",
        "stage2": "text -> units: the echo decoder with CE; the LLM's text embeddings frozen",
        "stage3": "echo training: pseudo-labels from a frozen stage-II decoder, h_t through the aligner",
    }
    for name, description in descriptions.items():
        stage = stages.add_parser(name, help=description, description=description)
        _stage_options(stage, lora=name != "stage2")
        if name == "stage2":
            stage.add_argument("--unit-vocab", type=whole_number("unit-vocab"),
                               help="build a new unit language of this many tokens from the manifest's units")
        if name == "stage3":
            stage.add_argument("--heldout", help="manifest whose teacher-forced unit accuracy is reported")
            stage.add_argument("--max-units", type=whole_number("max-units"), default=2048,
                               help="longest pseudo-label in unit tokens (the released decode budget)")
            stage.add_argument("--aligner-dropout", type=probability("aligner-dropout"), default=0.1,
                               help="dropout inside the aligner MLP while training (the authors' echo training: 0.1)")
        stage.set_defaults(run=_run_stage)
    demo = stages.add_parser("demo", help="all three stages on a synthetic spoken task, on the CPU")
    demo.add_argument("out", help="folder to create (data, stages, metrics.jsonl, model/)")
    demo.add_argument("--quick", action="store_true", help="a smaller task and fewer steps (the CI test)")
    demo.add_argument("--seed", type=whole_number("seed", least=0, most=MAX_SEED), default=0)
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(run=_run_demo)
