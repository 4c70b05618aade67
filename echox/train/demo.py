"""`echox train demo OUT`: the three stages on a synthetic spoken task, on the CPU, in minutes.

The task: a handful of spoken questions ("what colour is the sky") each with one short answer
("it is blue."). The questions are spoken by espeak-ng in several voices; one more voice is kept
out of training and only asked at the end. The answers are spoken in one voice and turned into
units by the stand-in extractor (stand_in_units.py: k-means of log-mel frames, since mHuBERT is
not available offline). The model is a tiny random checkpoint in the released layout.

    OUT/data/       question and answer WAVs, train.jsonl and heldout.jsonl
    OUT/base/       the tiny random model (EchoX-tiny) and its Whisper encoder
    OUT/stage1/ OUT/stage2/   each stage's model/ and train_state.pt
    OUT/model/      the final model (stage III), which `echox chat --model OUT/model` serves
    OUT/metrics.jsonl          one line per step of every stage: every loss term, lambda
    OUT/summary.json           first/last loss per stage, held-out accuracy, the answer, wall time
    OUT/answer.wav             the trained model's spoken answer to a held-out question

`--overwrite` replaces an earlier demo's files in OUT and nothing else: a folder the demo did not
mark as its own (DEMO_MARKER), or one holding anything the demo does not write, is refused before
any work.
"""

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..audio import load_audio
from ..errors import EchoXError
from ..outputs import check_output_folder
from ..tiny import TinySpec, write_tiny_checkpoint
from .manifest import read_manifest, write_manifest
from .stages import StageOptions, run_stage
from .stand_in_units import fit_centroids, log_mel_frames, units_of

QUESTIONS = [("what colour is the sky", "it is blue."), ("what colour is grass", "it is green."),
             ("what colour is snow", "it is white."), ("what colour is coal", "it is black."),
             ("what colour is the sun", "it is yellow."), ("what colour is blood", "it is red."),
             ("what colour is a cloud", "it is grey."), ("what colour is an orange", "it is orange.")]
TRAIN_VOICES = [("en-us", 160), ("en-gb", 170), ("en-us+m3", 150), ("en-gb+f2", 175), ("en-us+f3", 165)]
HELDOUT_VOICE = ("en-gb+m4", 160)
ANSWER_VOICE = ("en-us", 160)


@dataclass(frozen=True)
class DemoSize:
    questions: int
    voices: int
    steps: tuple[int, int, int]  # stage I, II, III
    batch_size: int
    clusters: int  # stand-in unit values
    unit_vocab: int  # unit-language tokens
    max_units: int  # pseudo-label length limit


FULL = DemoSize(questions=8, voices=5, steps=(300, 200, 150), batch_size=4, clusters=48, unit_vocab=96, max_units=200)
QUICK = DemoSize(questions=4, voices=2, steps=(40, 60, 20), batch_size=4, clusters=24, unit_vocab=40, max_units=80)
DEMO_MODEL = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
LR = {"stage1": 3e-3, "stage2": 3e-3, "stage3": 1e-3}


# What run_demo writes in OUT; with --overwrite these, and nothing else, are removed. The .partial
# names are what an interrupted stage leaves behind (export.save_model, loop.save_state).
# The marker says the folder is a demo's: a user's own `data/` or `model/` has the same names.
DEMO_MARKER = ".echox-train-demo"
DEMO_FOLDERS = {"data", "base", "stage1", "stage2", "model", "model.partial"}
DEMO_FILES = {DEMO_MARKER, "metrics.jsonl", "summary.json", "answer.wav", "heldout_accuracy.json", "train_state.pt",
              "train_state.pt.partial"}


def written_by_demo(path: Path) -> bool:
    if path.is_symlink():  # the demo makes no links: one leads to something of the user's
        return False
    return path.name in DEMO_FOLDERS and path.is_dir() or path.name in DEMO_FILES and path.is_file()


def earlier_run(out: Path, overwrite: bool) -> list[Path]:
    """What an earlier demo left in OUT, for --overwrite to remove; anything else in OUT is the user's
    and stops the demo before anything is deleted."""
    present = sorted(out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise EchoXError(f"{out}: exists and is not empty (pass --overwrite to replace an earlier demo's files)")
    if present and not (out / DEMO_MARKER).is_file():
        raise EchoXError(f"{out}: not the folder of an earlier demo (it has no {DEMO_MARKER}); --overwrite replaces "
                         "only a demo's own files: choose an empty or new folder")
    if foreign := next((path for path in present if not written_by_demo(path)), None):
        raise EchoXError(f"{foreign}: not a file the demo writes (--overwrite replaces only those); "
                         "move it or choose another folder")
    return present


def remove(paths: list[Path]):
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def require_espeak():
    if shutil.which("espeak-ng") is None:
        raise EchoXError("the training demo makes its speech with espeak-ng, which is not installed "
                         "(apt-get install espeak-ng)")


def speak(text: str, voice: tuple[str, int], path: Path):
    name, speed = voice
    subprocess.run(["espeak-ng", "-v", name, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True)


def build_task(data: Path, size: DemoSize, seed: int) -> tuple[Path, Path]:
    """Speak every question and answer; units for the answers; write train.jsonl and heldout.jsonl."""
    data.mkdir(parents=True)
    pairs = QUESTIONS[:size.questions]
    answers = []
    for i, (_, answer) in enumerate(pairs):
        speak(answer, ANSWER_VOICE, data / f"answer{i}.wav")
        answers.append(load_audio(data / f"answer{i}.wav"))
    centroids = fit_centroids(torch.cat([log_mel_frames(a) for a in answers]), size.clusters, seed)
    units = [units_of(a, centroids) for a in answers]
    records: dict[str, list[dict]] = {"train": [], "heldout": []}
    voices = [("train", v) for v in TRAIN_VOICES[:size.voices]] + [("heldout", HELDOUT_VOICE)]
    for i, (question, answer) in enumerate(pairs):
        for j, (split, voice) in enumerate(voices):
            speak(question, voice, data / f"q{i}_v{j}.wav")
            records[split].append({"audio": f"q{i}_v{j}.wav", "transcript": question, "response": answer,
                                   "response_units": units[i]})
    for split, lines in records.items():
        write_manifest(data / f"{split}.jsonl", lines)
    return data / "train.jsonl", data / "heldout.jsonl"


def loss_ends(metrics: Path) -> dict[str, dict[str, float]]:
    """First and last logged loss of each stage."""
    ends: dict[str, dict[str, float]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        ends.setdefault(record["stage"], {"first": record["loss"]})["last"] = record["loss"]
    return ends


def answer_heldout(model: Path, heldout: Path, output: Path) -> list[dict]:
    """The trained model answers every held-out spoken question through the inference engine
    (greedy); the first answer's speech goes to `output`."""
    from ..audio import write_wav
    from ..engine import AudioChunk, TextDelta, load
    from ..sampling import GREEDY
    engine = load(model, device="cpu")
    answers = []
    for example in read_manifest(heldout):
        text, chunks = "", []
        for event in engine.session(sampling=GREEDY, max_new_tokens=32, max_units=200).respond(audio=example.audio):
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, AudioChunk):
                chunks.append(event.samples)
        if not answers:
            write_wav(output, torch.cat(chunks) if chunks else torch.zeros(0))
        answers.append({"question": example.audio.name, "transcript": example.transcript,
                        "expected": example.response, "answer": text})
    return answers


def train_stages(out: Path, size: DemoSize, seed: int, train_manifest: Path, heldout_manifest: Path) -> dict:
    """Stage I from the tiny random model, II from I's model, III from II's into OUT/model."""
    base = write_tiny_checkpoint(out / "base", DEMO_MODEL, seed=seed)
    common = dict(manifest=train_manifest, batch_size=size.batch_size, seed=seed, metrics=out / "metrics.jsonl",
                  lora_rank=16, lora_alpha=32.0)
    run_stage("stage1", StageOptions(model=base, out=out / "stage1", steps=size.steps[0], lr=LR["stage1"], **common))
    run_stage("stage2", StageOptions(model=out / "stage1" / "model", out=out / "stage2", steps=size.steps[1],
                                     lr=LR["stage2"], unit_vocab=size.unit_vocab, **common))
    return run_stage("stage3", StageOptions(model=out / "stage2" / "model", out=out, steps=size.steps[2],
                                            lr=LR["stage3"], heldout=heldout_manifest, max_units=size.max_units,
                                            **common))


def report(summary: dict, out: Path):
    for stage, ends in summary["loss"].items():
        print(f"{stage}: loss {ends['first']:.3f} -> {ends['last']:.3f}")
    accuracy = summary["heldout_unit_accuracy"]
    print(f"held-out teacher-forced unit-token accuracy: {accuracy['before_stage3']:.3f} before stage III, "
          f"{accuracy['after_stage3']:.3f} after")
    for a in summary["heldout_answers"]:
        print(f"held-out {a['question']} ({a['transcript']!r}, a voice not trained on): {a['answer']!r}")
    print(f"{summary['heldout_answers_correct']} held-out questions answered as trained")
    first = out / "data" / summary["heldout_answers"][0]["question"]
    print(f"wrote {out / 'model'} and {out / 'answer.wav'} in {summary['wall_seconds']:.0f} s; "
          f"try: echox chat --model {out / 'model'} --input {first} --output answer.wav --greedy")


def run_demo(out: Path, quick: bool = False, overwrite: bool = False, seed: int = 0) -> dict:
    check_output_folder(out, "the demo's output")
    earlier = earlier_run(out, overwrite)
    require_espeak()
    remove(earlier)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `echox train demo`; --overwrite may replace this folder's demo files\n")
    started = time.monotonic()
    size = QUICK if quick else FULL
    train_manifest, heldout_manifest = build_task(out / "data", size, seed)
    echo = train_stages(out, size, seed, train_manifest, heldout_manifest)
    answers = answer_heldout(out / "model", heldout_manifest, out / "answer.wav")
    summary = {"loss": loss_ends(out / "metrics.jsonl"),
               "heldout_unit_accuracy": {"before_stage3": echo["heldout_accuracy_before"],
                                         "after_stage3": echo["heldout_accuracy_after"]},
               "heldout_answers": answers,
               "heldout_answers_correct": f"{sum(a['answer'] == a['expected'] for a in answers)}/{len(answers)}",
               "wall_seconds": round(time.monotonic() - started, 1), "quick": quick}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report(summary, out)
    return summary
