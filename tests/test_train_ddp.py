"""torchrun-style DistributedDataParallel on gloo: two processes, each with half of a global batch,
end one stage-III step with the gradients one process gets from the whole batch (lambda and the
total's branch included, which depend on the whole batch's losses)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from echox.audio import write_wav
from echox.cli import demo_question
from echox.train.loop import train
from echox.train.manifest import write_manifest
from echox.train import stages
from echox.train.stages import BUILDERS, StageOptions, prepare, steps_of

WORLD = 2


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    records = []
    for i, seconds in enumerate((0.6, 0.9, 1.2, 1.5)):  # different lengths: each process pads differently
        write_wav(folder / f"q{i}.wav", demo_question(seconds))
        records.append({"audio": f"q{i}.wav", "transcript": "ab cd"[:2 + i], "response": "yes no"[:3 + i]})
    write_manifest(folder / "train.jsonl", records)
    write_manifest(folder / "heldout.jsonl", records[:3])  # an odd count: the processes' shares differ
    return folder / "train.jsonl"


def one_step_gradients(model, manifest, out) -> list[torch.Tensor]:
    """One stage-III step through the real loop; the gradients it applied (after DDP's averaging)."""
    # No aligner dropout: its masks depend on how the batch is split.
    options = StageOptions(manifest=manifest, model=model, out=out, steps=1, batch_size=4, max_units=6,
                           lora_rank=2, lora_alpha=4.0, aligner_dropout=0.0)
    run = prepare("stage3", options)
    job = BUILDERS["stage3"](run, options)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient
        for param in job.params:
            if param.abs().sum() == 0:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(param.numel()))
    train(job.module, job.params, steps_of(job.items, job.lengths, options, run.rank, run.world), run.settings)
    return [p.grad.clone() for p in job.params]


def even_targets(out) -> tuple[int, int]:
    """A stand-in for unit_hits whose score is neither 0 nor 1 and differs between the processes'
    shares (the random model's real accuracy is 0 everywhere, which any way of adding up keeps)."""
    return ((out.targets % 2 == 0) & out.mask).sum().item(), out.mask.sum().item()


def heldout_accuracy(model, manifest, out) -> tuple[float, float]:
    """Stage III's held-out score, each process scoring its share in batches of its training share:
    the real one, and the stand-in's."""
    options = StageOptions(manifest=manifest, model=model, out=out, steps=1, batch_size=2, max_units=6,
                           lora_rank=2, heldout=manifest.parent / "heldout.jsonl")
    run = prepare("stage3", options)
    job = BUILDERS["stage3"](run, options)
    scored = stages.heldout_set(run, options)
    real = stages.heldout_accuracy(job.module, *scored, options.batch_size // run.world)
    unit_hits, stages.unit_hits = stages.unit_hits, even_targets
    try:
        return real, stages.heldout_accuracy(job.module, *scored, options.batch_size // run.world)
    finally:
        stages.unit_hits = unit_hits


def worker(rank, port, compute, model, manifest, folder):
    os.environ |= {"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    torch.save(compute(model, manifest, folder / f"rank{rank}"), folder / f"result{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_on_the_same_global_batch(tiny_model_dir, manifest, tmp_path):
    single = one_step_gradients(tiny_model_dir, manifest, tmp_path / "single")
    mp.spawn(worker, args=(free_port(), one_step_gradients, tiny_model_dir, manifest, tmp_path), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"result{rank}.pt")
        assert len(grads) == len(single)
        for got, expected in zip(grads, single):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in single) > 0
    lines = (tmp_path / "rank0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and not (tmp_path / "rank1" / "metrics.jsonl").exists()  # only process 0 writes


def test_two_processes_score_the_heldout_set_as_one(tiny_model_dir, manifest, tmp_path):
    single = heldout_accuracy(tiny_model_dir, manifest, tmp_path / "single")
    mp.spawn(worker, args=(free_port(), heldout_accuracy, tiny_model_dir, manifest, tmp_path), nprocs=WORLD, join=True)
    assert 0 < single[1] < 1 and [torch.load(tmp_path / f"result{rank}.pt") for rank in range(WORLD)] == [single] * WORLD
