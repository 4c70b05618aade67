"""The optimisation loop shared by the three stages.

A stage hands over an `nn.Module` whose forward takes its step's local batch and returns the
loss terms (a dict of scalars, "loss" being the one to minimise), and the list of parameters
that train. The loop, step by step: forward, backward, gradient clipping, AdamW; then one line
of `metrics.jsonl` (every term, averaged over all processes) and the progress bar.

Several processes: run the same command under `torchrun`; the loop joins the process group
that torchrun describes in the environment (gloo on CPU, NCCL on GPUs) and wraps the module in
DistributedDataParallel, which averages the gradients. Each process takes its slice of every
global batch (`batching.local_share`). Only process 0 writes files.

Resumable: `train_state.pt` holds the step, the trainable parameters, AdamW's state and the options
that define the run (`LoopSettings.identity`); batches and each step's random draws are functions of
(seed, step), so a resumed run with the same options continues exactly, and one with others is refused.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import EchoXError
from ..outputs import atomic_file

GRADIENT_CLIP = 1.0


def join_process_group(device: str) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, or (0, 1) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """A detached tensor summed over all processes (itself when there is one)."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """A detached scalar averaged over all processes (itself when there is one)."""
    return global_sum(value) / (dist.get_world_size() if dist.is_initialized() else 1)


@dataclass(frozen=True)
class LoopSettings:
    stage: str
    steps: int
    lr: float
    device: str
    metrics: Path
    state: Path
    log_every: int = 1
    save_every: int = 0
    resume: bool = False
    seed: int = 0
    identity: dict = field(default_factory=dict)  # option -> value: what a resumed run must match


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's random draws (the aligner's dropout) on one process: a function of the
    step, so a resumed run draws what the uninterrupted one did, on every process."""
    return (seed * 1_000_003 + step) * 4_099 + rank


class Progress:
    """One line per stage on stderr, redrawn in place: bar, step, loss, elapsed time."""

    def __init__(self, stage: str, total: int, start: int):
        self.stage, self.total, self.start_time = stage, total, time.monotonic()
        self.draw(start, None)

    def draw(self, step: int, loss: float | None):
        filled = 24 * step // max(self.total, 1)
        shown = "" if loss is None else f" loss {loss:.4f}"
        sys.stderr.write(f"\r{self.stage} [{'#' * filled}{'-' * (24 - filled)}] {step}/{self.total}{shown} "
                         f"{time.monotonic() - self.start_time:.0f}s")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def save_state(path: Path, step: int, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, identity: dict):
    state = {"step": step, "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
             "run": identity}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)  # a crash mid-save never leaves a half-written state behind


def read_state(path: Path, mmap: bool = False) -> dict:
    """The dict `save_state` wrote, or one clear error for any other file. With `mmap` its tensors
    are mapped, not read: what only looks at the rest costs no read of the parameters and moments."""
    if not path.is_file():
        raise EchoXError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - a damaged file fails in many ways (zip, pickle, OSError, struct)
        state = None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("optimizer"), dict)
            and isinstance(state.get("params"), list) and all(isinstance(t, torch.Tensor) for t in state["params"])):
        raise EchoXError(f"{path}: not a training state, or damaged")
    return state


WEIGHT_FINGERPRINTS = ("--model", "--whisper")  # run options that states saved by an older echox lack


def check_resumable(path: Path, identity: dict):
    """The state at `path` was saved by a run with these options (checked before a stage is built)."""
    saved = read_state(path, mmap=True).get("run")
    if not isinstance(saved, dict):  # a run started before the options were saved: resumable as before
        print(f"echox: note: {path} holds no run options (saved by an older echox): resuming it with "
              f"today's, unchecked", file=sys.stderr)
        return
    # Saved before the weights were fingerprinted: the other options are still checked.
    unchecked = [name for name in WEIGHT_FINGERPRINTS if name in identity and name not in saved]
    differ = [f"{name} {saved.get(name)} (now {identity.get(name)})"
              for name in dict.fromkeys([*saved, *identity])
              if name not in unchecked and saved.get(name) != identity.get(name)]
    if differ:
        raise EchoXError(f"{path}: saved by a run with other options: {'; '.join(differ)}; resume with that run's "
                         f"options, or start again with --overwrite")
    if unchecked:
        print(f"echox: note: {path} does not say which {' and '.join(unchecked)} it was trained from (saved by "
              f"an older echox): resuming it with today's, unchecked", file=sys.stderr)


def load_state(path: Path, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    state = read_state(path)
    if len(state["params"]) != len(params) or any(s.shape != p.shape for s, p in zip(state["params"], params)):
        raise EchoXError(f"{path}: this state belongs to another model or stage (its parameters do not match)")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError):
        raise EchoXError(f"{path}: not a training state, or damaged (its optimizer state)") from None
    with torch.no_grad():
        for saved, param in zip(state["params"], params):
            param.copy_(saved)
    return state["step"]


def cut_metrics(path: Path, stage: str, step: int):
    """Drop the stage's lines after `step`: an interrupted run logged steps past its last saved state,
    and the resumed run logs them again. Other stages' lines (the demo's shared file) stay."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if record.get("stage") != stage or record.get("step", 0) <= step:
            kept.append(line)
    with atomic_file(path) as temporary:
        temporary.write_text("".join(line + "\n" for line in kept))


def diverged(loss: float, step: int, settings: LoopSettings) -> EchoXError:
    """What stops a run whose loss is NaN or infinite: every later step, and the model saved at the
    end, would be NaN too (a too-high --lr does it), and a bare NaN is not JSON for metrics.jsonl."""
    return EchoXError(f"{settings.stage}: the loss is {loss} at step {step}: training diverged (lower --lr, now "
                      f"{settings.lr:g}); stopped without saving the model")


def train(model: nn.Module, params: list[nn.Parameter], batch_of_step: Callable[[int], object],
          settings: LoopSettings) -> list[dict]:
    """Run the steps; return the logged metric lines (also appended to settings.metrics on process 0)."""
    rank, world = join_process_group(settings.device)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    start = load_state(settings.state, params, optimizer) if settings.resume else 0
    if start > settings.steps:  # nothing to run, and saving at the end would mislabel the later state
        raise EchoXError(f"{settings.state}: saved at step {start}, past --steps {settings.steps}; "
                         f"resume with --steps {start} or more")
    if rank == 0 and settings.resume:
        cut_metrics(settings.metrics, settings.stage, start)
    stepped = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model  # buffers are constants
    progress = Progress(settings.stage, settings.steps, start) if rank == 0 else None
    logged = []
    for step in range(start, settings.steps):
        torch.manual_seed(step_seed(settings.seed, step, rank))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.device == "cuda"):
            terms = stepped(batch_of_step(step))
        line = {"stage": settings.stage, "step": step + 1} | {k: global_mean(v).item() for k, v in terms.items()}
        if not math.isfinite(line["loss"]):  # the same on every process: the loss is the global mean
            if progress:
                progress.close()
            raise diverged(line["loss"], step + 1, settings)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIP)
        optimizer.step()
        if rank == 0 and ((step + 1) % settings.log_every == 0 or step + 1 == settings.steps):
            logged.append(line)
            with settings.metrics.open("a") as f:
                f.write(json.dumps(line) + "\n")
        if progress:
            progress.draw(step + 1, line["loss"])
        if rank == 0 and settings.save_every and (step + 1) % settings.save_every == 0:
            save_state(settings.state, step + 1, params, optimizer, settings.identity)
    if progress:
        progress.close()
    if rank == 0:
        save_state(settings.state, settings.steps, params, optimizer, settings.identity)
    return logged
