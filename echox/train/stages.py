"""The three stages of echo training (SPEC §9), each from a model folder to a model folder.

  stage1  speech -> text   L_S2T = CE(response) + 0.3 CTC(transcript); Whisper frozen, adapter
                           trained, LLM through LoRA (merged when saved)
  stage2  text -> units    the echo decoder with CE on (response text ids -> unit tokens); its
                           text table (the LLM's, stored with it) frozen; optionally a new unit language
  stage3  echo             a frozen copy of the stage-II decoder turns each response text into
                           pseudo-label unit tokens (greedy, once per example); the trainable
                           decoder reads aligner_MLP(h_t); L_echo, L_den, lambda, total of SPEC §9;
                           gradients reach the LoRA and the adapter through h_t

Each stage reads `--model`, trains, and writes OUT/model in the released layout (export.py),
OUT/metrics.jsonl and the resumable OUT/train_state.pt (and stage II's OUT/unit_tokenizer.json, stage
III's OUT/heldout_accuracy.json). Nothing of the user's is written over: see `check_run_files`.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..adapter import load_adapter
from ..checkpoint import ModelFolder, open_model_folder, resolve_whisper
from ..echo import ECHO_PREFIX, echo_layout, load_echo_decoder
from ..errors import EchoXError
from ..llama import load_lm
from ..outputs import check_output_folder
from ..weights import Checkpoint
from ..whisper import load_whisper
from .batching import batch_at, local_share
from .echo_trainer import TrainableEchoDecoder, unit_hits
from .export import adapter_tensors, echo_tensors, llm_tensors, save_model
from .lora import TARGETS, add_lora, check_rank, parse_targets
from .loop import LoopSettings, check_resumable, global_mean, global_sum, join_process_group, train
from .losses import (denoising_loss, echo_lambda, sequence_cross_entropy, speech_to_text_loss, text_to_unit_loss,
                     total_loss)
from .manifest import Example, read_manifest
from .speech_to_text import SpeechToText, SpeechTurn, prepare_turns
from .units import UnitLanguage, write_unit_tokens


@dataclass(frozen=True)
class StageOptions:
    manifest: Path
    model: Path
    out: Path
    whisper: Path | None = None
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 1
    save_every: int = 0
    device: str = "cpu"
    checkpointed: bool = False
    resume: bool = False
    overwrite: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    unit_vocab: int | None = None  # stage 2: build a new unit language of this size
    heldout: Path | None = None  # stage 3: report teacher-forced unit accuracy on these
    max_units: int = 2048  # stage 3: pseudo-label length limit (the released decode budget)
    aligner_dropout: float = 0.1  # stage 3: the aligner MLP's dropout (the authors' echo training's)
    metrics: Path | None = None  # default OUT/metrics.jsonl (the demo gathers all stages in one)

    def __post_init__(self):
        parse_targets(self.lora_targets)  # a bad --lora-targets stops here, before any data or model loads

    def identity(self, stage: str, model: ModelFolder, whisper: Path) -> dict:
        """The options that define what a run trains, and on which batches: a resumed run must match them
        (same-shaped parameters loaded into other LoRA targets, another base model or other data, would
        make a model of neither run). The manifest is known by a digest of its bytes, the --model (and
        the Whisper encoder of the stages that hear speech) by a fingerprint of their weights, so a
        moved or copied folder still resumes."""
        digest = hashlib.sha256(self.manifest.read_bytes()).hexdigest()[:16]
        identity = {"stage": stage, "--manifest": f"sha256 {digest}", "--model": model.weights.fingerprint(),
                    "--batch-size": self.batch_size, "--lr": self.lr, "--seed": self.seed}
        if stage != "stage2":
            identity["--whisper"] = Checkpoint(whisper).fingerprint()
        if stage == "stage2":
            identity["--unit-vocab"] = self.unit_vocab
        else:
            targets = parse_targets(self.lora_targets)
            identity |= {"--lora-targets": ",".join(t for t in TARGETS if t in targets),
                         "--lora-rank": self.lora_rank, "--lora-alpha": self.lora_alpha}
        if stage == "stage3":
            identity |= {"--max-units": self.max_units, "--aligner-dropout": self.aligner_dropout}
        return identity

    @staticmethod
    def from_args(args) -> "StageOptions":
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(StageOptions) if hasattr(args, f.name)}
        paths = {k: Path(v) for k, v in given.items() if k in ("manifest", "model", "out", "whisper", "heldout") and v}
        return StageOptions(**(given | paths), checkpointed=args.gradient_checkpointing)


@dataclass
class Prepared:
    """What every stage starts from."""

    source: ModelFolder
    whisper: Path
    examples: list[Example]
    heldout: list[Example]  # stage III's --heldout manifest (read up front: a bad one stops before any work)
    settings: LoopSettings
    rank: int
    world: int


@dataclass
class Job:
    """A built stage: the module the loop steps, what trains, the examples, and what gets saved."""

    module: nn.Module
    params: list[nn.Parameter]
    items: list
    lengths: list[int]  # per item, for bucketing
    trained: Callable[[], dict[str, torch.Tensor]]  # released key -> tensor, read after training
    config_updates: dict = dataclasses.field(default_factory=dict)
    tokenizer_json: Path | None = None


UNIT_TOKENIZER = "unit_tokenizer.json"  # stage II's new unit language, copied into OUT/model when it is saved
HELDOUT_REPORT = "heldout_accuracy.json"


def run_files(stage: str, options: StageOptions) -> list[Path]:
    """Every path the stage writes in OUT (the demo's shared metrics file is not OUT's)."""
    names = ["model", "train_state.pt"]
    if options.metrics is None:
        names.append("metrics.jsonl")
    if stage == "stage2" and options.unit_vocab is not None:
        names.append(UNIT_TOKENIZER)
    if stage == "stage3" and options.heldout is not None:
        names.append(HELDOUT_REPORT)
    return [options.out / name for name in names]


def check_run_files(stage: str, options: StageOptions):
    """Nothing of the user's is written over: the --model folder is neither OUT nor inside a path the run
    writes, and an earlier run's files stay unless --overwrite or --resume says they may go."""
    files = run_files(stage, options)
    model = options.model.resolve()
    if model == options.out.resolve() or any(f.resolve() == model or f.resolve() in model.parents for f in files):
        raise EchoXError(f"--out {options.out}: the run would write into the --model folder {options.model}; "
                         f"choose another --out")
    existing = next((f for f in files if f.exists()), None)
    if existing and not (options.overwrite or options.resume):
        raise EchoXError(f"{existing}: already exists (pass --overwrite to replace it, or --resume)")


def prepare(stage: str, options: StageOptions) -> Prepared:
    if options.device == "cuda" and not torch.cuda.is_available():
        raise EchoXError("--device cuda was asked for, but torch sees no CUDA device")
    if options.device == "cuda":  # one GPU per torchrun process on each machine
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    check_output_folder(options.out, "--out")
    check_run_files(stage, options)
    rank, world = join_process_group(options.device)
    state, metrics = options.out / "train_state.pt", options.metrics or options.out / "metrics.jsonl"
    if options.steps < 1 or options.batch_size < 1:
        raise EchoXError("--steps and --batch-size must be at least 1")
    if options.batch_size % world:
        raise EchoXError(f"--batch-size {options.batch_size} does not split over {world} processes")
    examples = read_manifest(options.manifest, need_units=stage == "stage2", need_audio=stage != "stage2")
    heldout = read_manifest(options.heldout, need_audio=True) if stage == "stage3" and options.heldout else []
    if options.batch_size > len(examples):
        raise EchoXError(f"--batch-size {options.batch_size} is larger than the manifest ({len(examples)} examples)")
    source = open_model_folder(options.model)
    whisper = resolve_whisper(source, options.whisper)
    identity = options.identity(stage, source, whisper)
    if options.resume:
        check_resumable(state, identity)
    options.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    settings = LoopSettings(stage, options.steps, options.lr, options.device, metrics, state,
                            options.log_every, options.save_every, options.resume, options.seed, identity)
    return Prepared(source, whisper, examples, heldout, settings, rank, world)


def steps_of(items: list, lengths: list[int], options: StageOptions, rank: int, world: int):
    """step -> this process's share of that step's global batch."""
    def batch(step: int) -> list:
        return [items[i] for i in local_share(batch_at(step, lengths, options.batch_size, options.seed), rank, world)]
    return batch


# Stage I -------------------------------------------------------------------------------------------

class SpeechToTextStage(nn.Module):
    def __init__(self, model: SpeechToText):
        super().__init__()
        self.model = model

    def forward(self, turns: list[SpeechTurn]) -> dict[str, torch.Tensor]:
        out = self.model(turns)
        return {"loss": speech_to_text_loss(out.cross_entropy, out.ctc), "cross_entropy": out.cross_entropy,
                "ctc": out.ctc}


def speech_model(run: Prepared, options: StageOptions) -> tuple[SpeechToText, list[SpeechTurn], list[nn.Parameter]]:
    """The LLM with LoRA, the trainable adapter, and the examples' cached Whisper frames."""
    cfg, weights, device = run.source.config, run.source.weights, options.device
    check_rank(options.lora_rank, cfg.llm)  # before Whisper's pass over the examples
    whisper = load_whisper(run.whisper, torch.float32, device)
    turns = prepare_turns(run.examples, run.source.tokenizer, whisper)
    del whisper
    lm = load_lm(weights, cfg.llm, torch.float32, device)
    lora = add_lora(lm, parse_targets(options.lora_targets), options.lora_rank, options.lora_alpha)
    adapter = load_adapter(weights, cfg.adapter, torch.float32, device)
    adapter.requires_grad_(True)
    model = SpeechToText(lm, adapter, run.source.tokenizer, options.checkpointed)
    return model, turns, lora + list(adapter.parameters())


def turn_lengths(turns: list[SpeechTurn]) -> list[int]:
    return [len(t.response) + len(t.transcript) for t in turns]


def build_stage1(run: Prepared, options: StageOptions) -> Job:
    model, turns, params = speech_model(run, options)
    return Job(SpeechToTextStage(model), params, turns, turn_lengths(turns),
               lambda: llm_tensors(model.lm) | adapter_tensors(model.adapter, run.source))


# Stage II ------------------------------------------------------------------------------------------

class TextToUnitStage(nn.Module):
    def __init__(self, decoder: TrainableEchoDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        device = self.decoder.adapter.weight.device
        slots = [self.decoder.table(torch.tensor(text, device=device)) for text, _ in batch]
        out = self.decoder(slots, [units for _, units in batch])
        loss = sequence_cross_entropy(out.logits, out.targets, out.mask)
        return {"loss": loss, "unit_cross_entropy": loss}


def resize_units(tensors: dict[str, torch.Tensor], cfg, units: int, seed: int):
    """A new unit language makes the old unit rows meaningless: fresh unit embeddings and head rows."""
    gen = torch.Generator().manual_seed(seed)
    text = tensors["model.embed_tokens.weight"]
    width = tensors["lm_head.weight"].shape[1]
    tensors["unit_embedding.weight"] = torch.randn(units, text.shape[1], generator=gen).to(text) * text.float().std()
    fresh_rows = (torch.randn(units, width, generator=gen) / width ** 0.5).to(text)
    tensors["lm_head.weight"] = torch.cat([tensors["lm_head.weight"][:cfg.text_vocab_size], fresh_rows])
    return dataclasses.replace(cfg, unit_vocab_size=units, body=dataclasses.replace(
        cfg.body, vocab_size=cfg.text_vocab_size + units))


def unit_language(run: Prepared, options: StageOptions) -> tuple[UnitLanguage, Path | None]:
    """The manifest's new unit language (written into OUT/unit_tokenizer.json), or the model's own."""
    cfg, tokenizer = run.source.config.echo, run.source.tokenizer
    if options.unit_vocab is None:
        return UnitLanguage.from_tokenizer(tokenizer, cfg.text_vocab_size, cfg.unit_vocab_size), None
    language = UnitLanguage.build([list(e.response_units) for e in run.examples], options.unit_vocab)
    written = options.out / UNIT_TOKENIZER
    if run.rank == 0 and len(language.tokens) < options.unit_vocab:  # the decoder's table is made this size
        print(f"stage2: the manifest's units make {len(language.tokens)} unit tokens (every value seen and every "
              f"merge that repeats), fewer than --unit-vocab {options.unit_vocab}")
    if run.rank == 0:
        write_unit_tokens(tokenizer.path, written, language, cfg.text_vocab_size)
    return language, written


def unit_tokens(language: UnitLanguage, example: Example, options: StageOptions) -> list[int]:
    try:
        return language.encode(list(example.response_units))
    except EchoXError as e:
        raise EchoXError(f"{options.manifest}:{example.line}: {e} (pass --unit-vocab N to build a unit "
                         f"language from the manifest)") from None


def build_stage2(run: Prepared, options: StageOptions) -> Job:
    source, tokenizer = run.source, run.source.tokenizer
    cfg = source.config.echo
    language, tokenizer_json = unit_language(run, options)
    # The decoder's text table stays the copy stored with it, frozen: the one inference reads. (The
    # authors' training ties it to the LLM's output head, so in a released model it is the LLM's.)
    tensors = source.weights.take(echo_layout(cfg), "echo decoder", torch.float32, options.device, strip=ECHO_PREFIX)
    if options.unit_vocab is not None:
        cfg = resize_units(tensors, cfg, len(language.tokens), options.seed)
    decoder = TrainableEchoDecoder(cfg, tokenizer.echo_prefixes(), tokenizer.eot, tensors, options.checkpointed)
    decoder.aligner_mlp.requires_grad_(False)  # stage II never runs it: text embeddings fill the slots
    pairs = [(tokenizer.tok(e.response), [cfg.text_vocab_size + k for k in unit_tokens(language, e, options)])
             for e in run.examples]
    lengths = [len(text) + len(units) for text, units in pairs]
    return Job(TextToUnitStage(decoder), [p for p in decoder.parameters() if p.requires_grad], pairs, lengths,
               lambda: echo_tensors(decoder), {"unit_vocab_size": cfg.unit_vocab_size}, tokenizer_json)


# Stage III -----------------------------------------------------------------------------------------

class EchoStage(nn.Module):
    def __init__(self, speech: SpeechToText, decoder: TrainableEchoDecoder):
        super().__init__()
        self.speech, self.decoder = speech, decoder

    def unit_logits(self, turns: list[SpeechTurn], labels: list["PseudoLabel"], with_losses: bool = True):
        """(speech-to-text output, aligner_MLP(h_t) [B, n, H], the decoder's teacher-forced logits)."""
        out = self.speech(turns, with_losses)
        denoised = self.decoder.aligner_mlp(out.hidden)
        lengths = out.text_mask.sum(1).tolist()
        units = self.decoder([denoised[b, :n] for b, n in enumerate(lengths)], [label.units for label in labels],
                             [label.ended for label in labels])
        return out, denoised, units

    def forward(self, batch: list[tuple[SpeechTurn, "PseudoLabel"]]) -> dict[str, torch.Tensor]:
        out, denoised, units = self.unit_logits([t for t, _ in batch], [p for _, p in batch])
        s2t = speech_to_text_loss(out.cross_entropy, out.ctc)
        echo = sequence_cross_entropy(units.logits, units.targets, units.mask)
        denoising = denoising_loss(denoised, self.decoder.text_embeddings[out.text_ids], out.text_mask)
        # lambda and the total's branch are values of the whole global batch (the same on every process).
        weight = echo_lambda(global_mean(echo), global_mean(denoising))
        t2u = text_to_unit_loss(echo, denoising, weight)
        loss = total_loss(s2t, t2u, branch_value=global_mean(s2t))
        return {"loss": loss, "s2t": s2t, "cross_entropy": out.cross_entropy, "ctc": out.ctc, "echo": echo,
                "denoising": denoising, "lambda": weight, "t2u": t2u}


@dataclass(frozen=True)
class PseudoLabel:
    units: list[int]  # the frozen decoder's unit tokens for a response
    ended: bool  # it wrote eot; False: cut at --max-units, so training teaches no eot after them


@torch.no_grad()
def pseudo_labels(source: ModelFolder, examples: list[Example], options: StageOptions) -> list[PseudoLabel]:
    """The frozen stage-II decoder's greedy unit tokens for each response text (SPEC §7 prompt)."""
    frozen = load_echo_decoder(source, torch.float32, options.device)
    tokenizer = source.tokenizer
    labels = []
    for example in examples:
        text = torch.tensor(tokenizer.tok(example.response), device=options.device)
        prompt = frozen.embed(torch.cat([frozen.text_prefix, text, frozen.unit_prefix]))  # [L, h]
        tally = frozen.tally(len(prompt), options.max_units)
        labels.append(PseudoLabel(list(frozen.generate_from_prompt(prompt, tally)), tally.at_eot))
    return labels


@torch.no_grad()
def heldout_accuracy(stage: EchoStage, turns: list[SpeechTurn], labels: list[PseudoLabel], batch_size: int) -> float:
    """Teacher-forced unit accuracy over every process's share of the held-out set, scored in batches of
    the training's size, with the module in eval mode (no dropout), as inference runs."""
    training = stage.training
    stage.eval()
    try:
        hits, targets = 0, 0
        for i in range(0, len(turns), batch_size):
            got, of = unit_hits(stage.unit_logits(turns[i:i + batch_size], labels[i:i + batch_size], False)[2])
            hits, targets = hits + got, targets + of
        device = stage.decoder.adapter.weight.device
        hits, targets = global_sum(torch.tensor([hits, targets], dtype=torch.float64, device=device)).tolist()
        return hits / targets
    finally:
        stage.train(training)


def build_stage3(run: Prepared, options: StageOptions) -> Job:
    source, tokenizer = run.source, run.source.tokenizer
    speech, turns, params = speech_model(run, options)
    labels = pseudo_labels(source, run.examples, options)
    tensors = source.weights.take(echo_layout(source.config.echo), "echo decoder", torch.float32, options.device,
                                  strip=ECHO_PREFIX)
    decoder = TrainableEchoDecoder(source.config.echo, tokenizer.echo_prefixes(), tokenizer.eot, tensors,
                                   options.checkpointed, options.aligner_dropout)
    lengths = [len(t.response) + len(p.units) for t, p in zip(turns, labels)]
    return Job(EchoStage(speech, decoder), params + list(decoder.parameters()), list(zip(turns, labels)), lengths,
               lambda: llm_tensors(speech.lm) | adapter_tensors(speech.adapter, source) | echo_tensors(decoder))


def heldout_set(run: Prepared, options: StageOptions) -> tuple[list[SpeechTurn], list[PseudoLabel]]:
    """This process's share of the held-out turns and their pseudo-labels, from the same frozen decoder
    (every process prepares its own share, so none waits on another's)."""
    held = run.heldout[run.rank::run.world]
    whisper = load_whisper(run.whisper, torch.float32, options.device)
    return prepare_turns(held, run.source.tokenizer, whisper), pseudo_labels(run.source, held, options)


# Running a stage -----------------------------------------------------------------------------------

BUILDERS = {"stage1": build_stage1, "stage2": build_stage2, "stage3": build_stage3}


def clear_earlier_run(run: Prepared, options: StageOptions):
    """--overwrite's earlier OUT/metrics.jsonl and training state go together, and only now, with the
    data and model read and the stage built: a run stopped by a mistake before training leaves both.
    Together, because an interrupted new run must not leave the earlier run's state beside its own
    metrics, for a --resume to continue the one and splice the other. The earlier model stays until
    the new one replaces it."""
    if run.rank != 0 or options.resume:
        return
    if options.metrics is None:
        run.settings.metrics.unlink(missing_ok=True)
    run.settings.state.unlink(missing_ok=True)


@contextlib.contextmanager
def no_empty_folder_left(folder: Path):
    """A run that fails before writing anything leaves no empty OUT behind, if it made OUT. Only
    on a failure, and only in process 0 (torchrun's RANK), which alone writes: another process
    that got here first must not remove the folder process 0 is about to write into."""
    made = not folder.exists()
    try:
        yield
    except BaseException:
        if made and os.environ.get("RANK", "0") == "0":
            with contextlib.suppress(OSError):  # rmdir removes only an empty folder: written files stay
                folder.rmdir()
        raise


def run_stage(name: str, options: StageOptions) -> dict:
    """Train one stage and save its model; return the logged metrics (and, for stage III with
    --heldout, the teacher-forced unit accuracy before and after)."""
    with no_empty_folder_left(options.out):
        return trained_stage(name, options)


def trained_stage(name: str, options: StageOptions) -> dict:
    run = prepare(name, options)
    job = BUILDERS[name](run, options)
    heldout = heldout_set(run, options) if run.heldout else None  # a share on every process, maybe empty
    local_batch = options.batch_size // run.world
    result = {}
    if heldout is not None:
        result["heldout_accuracy_before"] = heldout_accuracy(job.module, *heldout, local_batch)
    clear_earlier_run(run, options)
    result["metrics"] = train(job.module, job.params, steps_of(job.items, job.lengths, options, run.rank, run.world),
                              run.settings)
    if heldout is not None:
        result["heldout_accuracy_after"] = heldout_accuracy(job.module, *heldout, local_batch)
    if heldout is not None and run.rank == 0:
        accuracy = {k: v for k, v in result.items() if k != "metrics"}
        (options.out / HELDOUT_REPORT).write_text(json.dumps(accuracy, indent=2) + "\n")
        print(f"held-out teacher-forced unit-token accuracy: {accuracy['heldout_accuracy_before']:.3f} before "
              f"stage III, {accuracy['heldout_accuracy_after']:.3f} after")
    if run.rank == 0:
        save_model(options.out / "model", run.source, job.trained(), run.whisper, job.config_updates,
                   job.tokenizer_json)
        print(f"{name}: wrote {options.out / 'model'}")
    return result
