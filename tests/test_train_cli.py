"""`echox train stageN`: one error line for user mistakes, nothing of theirs overwritten, and a
resumed run that ends exactly where an uninterrupted one does."""

import contextlib
import json
import math
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from echox.audio import write_wav
from echox.errors import EchoXError
from echox.checkpoint import open_model_folder
from echox.cli import demo_question, main
from echox.echo import EchoVocabulary
from echox.train import demo
from echox.train.manifest import write_manifest
from echox.train.speech_to_text import SpeechToText
from echox.weights import Checkpoint


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    write_wav(folder / "q.wav", demo_question(0.5))
    records = [{"audio": "q.wav", "transcript": "hi", "response": f"answer {i}.",
                "response_units": [(7 * i + 3 * j) % 20 for j in range(12)]} for i in range(4)]
    write_manifest(folder / "train.jsonl", records)
    return folder / "train.jsonl"


def stage2(model, manifest, out, *extra):
    return main(["train", "stage2", "--manifest", str(manifest), "--model", str(model), "--out", str(out),
                 "--batch-size", "2", "--unit-vocab", "30", *extra])


def fails_with(capsys, code, pattern):
    err = capsys.readouterr().err
    assert code == 2 and pattern in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("echox: error:"), err  # one line, no traceback


@pytest.mark.parametrize("stage, flag, value, message", [
    ("stage1", "--log-every", "0", "log-every must be a whole number >= 1"),  # was a ZeroDivisionError
    ("stage1", "--lr", "nan", "lr must be a finite number > 0"),  # was torch's ValueError
    ("stage1", "--lr", "-1", "lr must be a finite number > 0"),
    ("stage1", "--save-every", "-5", "save-every must be a whole number >= 0"),  # was taken silently
    ("stage1", "--lora-rank", "0", "lora-rank must be a whole number >= 1"),
    ("stage2", "--unit-vocab", "0", "unit-vocab must be a whole number >= 1"),
    ("stage3", "--max-units", "0", "max-units must be a whole number >= 1"),
    ("stage3", "--aligner-dropout", "1", "aligner-dropout must be a number in [0, 1)"),
    ("stage1", "--seed", "10000000000", "seed must be a whole number from 0 to 4294967295"),  # was a ValueError
])
def test_bad_numbers_are_refused_while_parsing(tmp_path, capsys, stage, flag, value, message):
    with pytest.raises(SystemExit) as stop:  # argparse: a usage line and the reason, exit status 2
        main(["train", stage, "--manifest", "m.jsonl", "--model", "m", "--out", str(tmp_path / "out"), flag, value])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_bad_manifest_line_is_named(tiny_model_dir, manifest, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(manifest.read_text() + '{"audio": "q.wav", "transcript": "x"}\n')
    (tmp_path / "q.wav").write_bytes((manifest.parent / "q.wav").read_bytes())
    fails_with(capsys, stage2(tiny_model_dir, bad, tmp_path / "out"), "bad.jsonl:5: field 'response'")


def test_units_the_model_cannot_spell_are_named(tiny_model_dir, manifest, tmp_path, capsys):
    code = main(["train", "stage2", "--manifest", str(manifest), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "out"), "--batch-size", "2"])  # the tiny model's own random unit tokens
    fails_with(capsys, code, "has no token in this unit language (pass --unit-vocab N")
    assert not (tmp_path / "out").exists()  # the run made it, and stopped before writing anything


def float_wav(samples: list[float]) -> bytes:
    """A 16 kHz mono IEEE-float WAV, whose samples may be anything."""
    payload = struct.pack(f"<{len(samples)}f", *samples)
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(payload)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload)


@pytest.mark.parametrize("audio, message", [
    (b"not audio", "not a"),  # WAV, or readable (soundfile)
    (float_wav([0.0] * 8000 + [math.nan] + [0.0] * 100), "holds NaN or infinite samples"),
    (float_wav([0.0] * 8000 + [5000.0] + [0.0] * 100), "sample magnitude 5000 is absurd"),
], ids=["not audio", "NaN after 0.5 s", "too loud after 0.5 s"])
def test_unreadable_audio_is_named_with_its_line_before_any_work(tiny_model_dir, manifest, tmp_path, capsys, audio,
                                                                  message):
    """It was named without its line, once Whisper reached it (hours into a real corpus); of a WAV
    file only the first 10 ms were checked before."""
    (tmp_path / "q.wav").write_bytes((manifest.parent / "q.wav").read_bytes())
    (tmp_path / "bad.wav").write_bytes(audio)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(manifest.read_text() + json.dumps({"audio": "bad.wav", "transcript": "x", "response": "y."}))
    code = main(["train", "stage1", "--manifest", str(bad), "--model", str(tmp_path / "no-model"),
                 "--out", str(tmp_path / "out"), "--batch-size", "2"])
    fails_with(capsys, code, f"bad.jsonl:5: {tmp_path / 'bad.wav'}: {message}")
    assert not (tmp_path / "out").exists()


def test_an_existing_model_is_not_overwritten(tiny_model_dir, manifest, tmp_path, capsys):
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "mine.txt").write_text("keep")
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path / "out"), "already exists")
    assert (tmp_path / "out" / "model" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("out", ["the model folder", "a folder whose model/ it is"])
def test_an_out_that_would_write_into_the_model_folder_is_refused(tiny_root, manifest, tmp_path, capsys, out):
    """`--model M --out M` wrote the new unit language over M/tokenizer.json: M no longer loaded."""
    shutil.copytree(tiny_root, tmp_path / "root")
    model = tmp_path / "root" / "EchoX-tiny"
    if out == "a folder whose model/ it is":
        model = model.rename(tmp_path / "root" / "model")
    before = {path: path.read_bytes() for path in model.iterdir()}
    fails_with(capsys, stage2(model, manifest, model if out == "the model folder" else model.parent, "--overwrite"),
               "the run would write into the --model folder")
    assert {path: path.read_bytes() for path in model.iterdir()} == before


@pytest.mark.parametrize("name", ["train_state.pt", "unit_tokenizer.json"])
def test_an_earlier_runs_files_are_kept_without_overwrite(tiny_model_dir, manifest, tmp_path, capsys, name):
    (tmp_path / name).write_text("mine")
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path), f"{name}: already exists")
    assert (tmp_path / name).read_text() == "mine"
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "1", "--overwrite") == 0


def test_resuming_ends_where_an_uninterrupted_run_ends(tiny_model_dir, manifest, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert stage2(tiny_model_dir, manifest, straight, "--steps", "4") == 0
    assert stage2(tiny_model_dir, manifest, resumed, "--steps", "2") == 0
    assert stage2(tiny_model_dir, manifest, resumed, "--steps", "4", "--resume") == 0
    assert stage2(tiny_model_dir, manifest, resumed, "--steps", "3", "--resume") == 2  # saved at step 4 already
    a, b = Checkpoint(straight / "model"), Checkpoint(resumed / "model")
    for key in a.keys():
        torch.testing.assert_close(a.get(key), b.get(key), rtol=0, atol=0, msg=key)
    # The decoder's text table stays frozen: the copy stored with it, which inference reads.
    table = "unit_translator.model.embed_tokens.weight"
    torch.testing.assert_close(a.get(table), Checkpoint(tiny_model_dir).get(table), rtol=0, atol=0)
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert (resumed / "metrics.jsonl").read_text().splitlines() == (straight / "metrics.jsonl").read_text().splitlines()
    # The new unit language is in the saved tokenizer and config, and the engine reads it back.
    folder = open_model_folder(straight / "model")
    units = EchoVocabulary.from_tokenizer(folder.tokenizer, folder.config.echo).units
    assert len(units) == folder.config.echo.unit_vocab_size <= 30
    spoken = {u for line in manifest.read_text().splitlines() for u in json.loads(line)["response_units"]}
    assert {u for token in units for u in token} == spoken


@pytest.mark.parametrize("changed, message", [
    (["--seed", "7"], "--seed 0 (now 7)"),
    (["--lr", "0.002", "--batch-size", "4"], "--batch-size 2 (now 4); --lr 0.001 (now 0.002)"),
    (["--unit-vocab", "25"], "--unit-vocab 30 (now 25)"),
    (["other manifest"], "--manifest sha256 "),
])
def test_resuming_with_other_options_is_refused_by_name(tiny_model_dir, manifest, tmp_path, capsys, changed, message):
    """A state loaded into a run with other options (seed, data, unit language) made a model of neither."""
    assert stage2(tiny_model_dir, manifest, tmp_path / "out", "--steps", "1") == 0
    state = (tmp_path / "out" / "train_state.pt").read_bytes()
    if changed == ["other manifest"]:
        shutil.copyfile(manifest.parent / "q.wav", tmp_path / "q.wav")
        (tmp_path / "other.jsonl").write_text(manifest.read_text().replace("answer 0", "answer zero"))
        manifest, changed = tmp_path / "other.jsonl", []
    capsys.readouterr()
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path / "out", "--steps", "2", "--resume", *changed),
               f"train_state.pt: saved by a run with other options: {message}")
    assert (tmp_path / "out" / "train_state.pt").read_bytes() == state


def test_a_state_saved_without_its_options_resumes_with_a_note(tiny_model_dir, manifest, tmp_path, capsys):
    """States saved before the options were kept (2026-12-02) still resume: nothing to check them by."""
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "1") == 0
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["run"]
    torch.save(state, tmp_path / "train_state.pt")
    capsys.readouterr()
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "2", "--resume") == 0
    assert "holds no run options (saved by an older echox): resuming it with today's, unchecked" in \
        capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resuming_onto_another_base_model_is_refused_and_a_moved_one_resumes(tiny_root, manifest, tmp_path, capsys):
    """Same shapes, other weights: the saved LoRA and echo decoder would go on training on a model they
    were not trained from. The model is known by its weights, so a copy in another place resumes."""
    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(tiny_root, moved)
    shutil.copytree(tiny_root, other)
    weights = other / "EchoX-tiny" / "model-00002-of-00002.safetensors"
    tensors = {key: value.clone() for key, value in load_file(weights).items()}
    next(iter(tensors.values())).view(-1)[0] += 1
    save_file(tensors, str(weights))
    out = tmp_path / "out"
    assert stage2(tiny_root / "EchoX-tiny", manifest, out, "--steps", "1") == 0
    state = (out / "train_state.pt").read_bytes()
    capsys.readouterr()
    fails_with(capsys, stage2(other / "EchoX-tiny", manifest, out, "--steps", "2", "--resume"),
               "train_state.pt: saved by a run with other options: --model sha256 ")
    assert (out / "train_state.pt").read_bytes() == state
    assert stage2(moved / "EchoX-tiny", manifest, out, "--steps", "2", "--resume") == 0


def test_a_state_saved_without_its_models_fingerprint_resumes_with_a_note(tiny_model_dir, manifest, tmp_path, capsys):
    """States saved before the --model was kept: the other options are still checked."""
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "1") == 0
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["run"]["--model"]
    torch.save(state, tmp_path / "train_state.pt")
    capsys.readouterr()
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path, "--steps", "2", "--resume", "--seed", "3"),
               "--seed 0 (now 3)")
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "2", "--resume") == 0
    assert "does not say which --model it was trained from (saved by an older echox): resuming it with " \
           "today's, unchecked" in capsys.readouterr().err


def test_resuming_into_other_lora_targets_is_refused(tiny_model_dir, manifest, tmp_path, capsys):
    """gate and up adapters have the same shapes: the state loaded into the wrong ones without a word."""
    def stage1(*extra):
        return main(["train", "stage1", "--manifest", str(manifest), "--model", str(tiny_model_dir), "--out",
                     str(tmp_path), "--batch-size", "2", "--lora-rank", "2", *extra])
    assert stage1("--steps", "1", "--lora-targets", "gate") == 0
    capsys.readouterr()
    fails_with(capsys, stage1("--steps", "2", "--resume", "--lora-targets", "up", "--lora-alpha", "64"),
               "--lora-targets gate (now up); --lora-alpha 16.0 (now 64.0)")


@pytest.mark.parametrize("value", ["", ","])
def test_empty_lora_targets_are_refused_before_any_work(tmp_path, capsys, value):
    code = main(["train", "stage1", "--manifest", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out"), "--lora-targets", value])  # was an UnboundLocalError after loading
    fails_with(capsys, code, "LoRA targets must be a comma-separated subset of q, k, v")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out, message", [("exists.wav", "exists.wav: is a file"),
                                          ("exists.wav/sub", "exists.wav: is a file"),
                                          ("/proc/x", "/proc: cannot write")])
@pytest.mark.parametrize("command", ["stage2", "demo"])
def test_an_out_that_cannot_be_a_folder_is_named(tiny_model_dir, manifest, tmp_path, monkeypatch, capsys, command,
                                                 out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists.wav").write_bytes(b"mine")
    code = main(["train", "demo", out, "--quick"]) if command == "demo" else stage2(tiny_model_dir, manifest, out)
    fails_with(capsys, code, message)  # were FileExistsError, NotADirectoryError, FileNotFoundError tracebacks
    assert (tmp_path / "exists.wav").read_bytes() == b"mine"


def _truncated(path):
    torch.save({"step": 1, "params": [torch.zeros(64)]}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage", [
    _truncated,  # was torch's RuntimeError
    lambda path: path.write_bytes(bytes(range(256)) * 4),  # was an UnpicklingError
    lambda path: path.write_bytes(b""),  # was an EOFError
    lambda path: torch.save({"step": 1}, path),  # was KeyError 'params'
])
def test_a_damaged_training_state_is_named(tiny_model_dir, manifest, tmp_path, capsys, damage):
    (tmp_path / "out").mkdir()
    damage(tmp_path / "out" / "train_state.pt")
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path / "out", "--resume"),
               "train_state.pt: not a training state, or damaged")


def test_a_training_state_with_a_damaged_optimizer_is_named(tiny_model_dir, manifest, tmp_path, capsys):
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "1") == 0
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    torch.save(state | {"optimizer": {"state": {}}}, tmp_path / "train_state.pt")
    capsys.readouterr()
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path, "--steps", "2", "--resume"),
               "train_state.pt: not a training state, or damaged (its optimizer")


def test_a_resumed_run_logs_each_step_once(tiny_model_dir, manifest, tmp_path):
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "2") == 0
    with (tmp_path / "metrics.jsonl").open("a") as f:  # steps logged after the saved state, then interrupted
        f.write(json.dumps({"stage": "stage2", "step": 3, "loss": 99.0}) + '\n{"stage": "stage2", "st')
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "4", "--resume") == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and 99.0 not in [line["loss"] for line in lines]


@pytest.mark.parametrize("broken", ["manifest", "model"])
def test_overwrite_keeps_the_old_metrics_until_training_starts(tiny_model_dir, manifest, tmp_path, capsys, broken):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("old\n")
    bad_manifest, missing_model = tmp_path / "bad.jsonl", tmp_path / "no-model"
    bad_manifest.write_text("{not json\n")
    code = (stage2(tiny_model_dir, bad_manifest, out, "--overwrite") if broken == "manifest"
            else stage2(missing_model, manifest, out, "--overwrite"))
    assert code == 2 and capsys.readouterr().err.startswith("echox: error:")
    assert (out / "metrics.jsonl").read_text() == "old\n"


def test_a_diverging_run_stops_without_saving_a_nan_model(tiny_model_dir, manifest, tmp_path, capsys):
    """The loss went NaN from step 2 and the run went on: bare NaN in metrics.jsonl (not JSON), a NaN
    model saved, exit 0."""
    code = stage2(tiny_model_dir, manifest, tmp_path / "out", "--steps", "4", "--lr", "1e308")
    err = capsys.readouterr().err
    assert code == 2 and "echox: error: stage2: the loss is nan at step 2: training diverged (lower --lr" in err, err
    assert not (tmp_path / "out" / "model").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_an_interrupted_overwrite_leaves_no_earlier_state_to_resume(tiny_model_dir, manifest, tmp_path, monkeypatch,
                                                                     capsys):
    """The earlier run's state stayed beside the new run's metrics: --resume continued the one and
    spliced its steps onto the other's log."""
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "2") == 0
    model = {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("echox.train.stages.train", interrupted)
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "4", "--overwrite") == 130  # Ctrl-C
    monkeypatch.undo()
    assert not (tmp_path / "train_state.pt").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()} == model  # until replaced
    capsys.readouterr()
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path, "--steps", "4", "--resume"),
               "no training state to resume from")


@pytest.mark.parametrize("where", ["folder", "current folder"])
def test_demo_overwrite_refuses_a_folder_holding_the_users_files(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "mine.txt").write_text("notes")
    (tmp_path / "metrics.jsonl").write_text("an earlier demo's\n")
    (tmp_path / demo.DEMO_MARKER).write_text("")
    monkeypatch.chdir(tmp_path)
    out = "." if where == "current folder" else str(tmp_path)
    fails_with(capsys, main(["train", "demo", out, "--overwrite", "--quick"]), "mine.txt: not a file the demo writes")
    assert (tmp_path / "mine.txt").read_text() == "notes"
    assert (tmp_path / "metrics.jsonl").read_text() == "an earlier demo's\n"  # nothing deleted before refusing


def test_demo_overwrite_refuses_a_folder_no_demo_made_even_with_the_demos_names(tmp_path, capsys):
    """A user's own data/ and model/ have the demo's names: without the demo's marker nothing goes."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my_corpus.jsonl").write_text("mine")
    fails_with(capsys, main(["train", "demo", str(tmp_path), "--overwrite", "--quick"]), "not the folder of an earlier demo")
    assert (tmp_path / "data" / "my_corpus.jsonl").read_text() == "mine"


def test_demo_overwrite_removes_only_an_earlier_demos_files(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    (out / "stage1" / "model").mkdir(parents=True)
    for name in (demo.DEMO_MARKER, "metrics.jsonl", "answer.wav", "train_state.pt", "stage1/model/config.json"):
        (out / name).write_text("earlier")

    def stop(*_):
        raise EchoXError("stopped after clearing")
    monkeypatch.setattr(demo, "require_espeak", lambda: None)
    monkeypatch.setattr(demo, "build_task", stop)
    fails_with(capsys, main(["train", "demo", str(out), "--overwrite", "--quick"]), "stopped after clearing")
    # The folder itself stays (it may be the current one), marked as a demo's again.
    assert [path.name for path in out.iterdir()] == [demo.DEMO_MARKER]


def test_stage3_with_aligner_dropout_resumes_exactly(tiny_model_dir, manifest, tmp_path):
    """Each step's dropout draws from (seed, step, process): a resumed run draws what the whole run did."""
    def stage3(out, *extra):
        return main(["train", "stage3", "--manifest", str(manifest), "--model", str(tiny_model_dir), "--out", str(out),
                     "--batch-size", "2", "--max-units", "6", "--lora-rank", "2", "--aligner-dropout", "0.5", *extra])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert stage3(straight, "--steps", "3") == 0
    assert stage3(resumed, "--steps", "2") == 0
    assert stage3(resumed, "--steps", "3", "--resume") == 0
    a, b = Checkpoint(straight / "model"), Checkpoint(resumed / "model")
    for key in a.keys():
        torch.testing.assert_close(a.get(key), b.get(key), rtol=0, atol=0, msg=key)


def stage3(model, manifest, out, *extra):
    return main(["train", "stage3", "--manifest", str(manifest), "--model", str(model), "--out", str(out),
                 "--batch-size", "2", "--max-units", "6", "--lora-rank", "2", *extra])


def test_heldout_is_scored_in_training_sized_batches_without_the_loss_logits(tiny_model_dir, manifest, tmp_path,
                                                                              monkeypatch):
    """All held-out turns went through one forward pass, with the CTC and LLM logits of the losses: at a
    real vocabulary and a few hundred turns, more memory than a GPU has."""
    calls, forward = [], SpeechToText.forward

    def spy(self, turns, *args):
        out = forward(self, turns, *args)
        calls.append((len(turns), out.ctc is not None))
        return out
    monkeypatch.setattr(SpeechToText, "forward", spy)
    shutil.copyfile(manifest.parent / "q.wav", tmp_path / "q.wav")
    (tmp_path / "heldout.jsonl").write_text(manifest.read_text() + manifest.read_text()[:-1] + "\n")  # 8 turns
    assert stage3(tiny_model_dir, manifest, tmp_path / "out", "--steps", "1", "--heldout",
                  str(tmp_path / "heldout.jsonl")) == 0
    scoring = [size for size, losses in calls if not losses]
    assert max(scoring) == 2 and sum(scoring) == 2 * 8  # before and after training
    assert [call for call in calls if call[1]] == [(2, True)]  # the one training step
    accuracy = json.loads((tmp_path / "out" / "heldout_accuracy.json").read_text())
    assert 0 <= accuracy["heldout_accuracy_before"] <= 1 and 0 <= accuracy["heldout_accuracy_after"] <= 1


@pytest.mark.parametrize("heldout, message", [("none.jsonl", "none.jsonl: manifest not found"),
                                              (".", ": not a file (a manifest is a JSONL file)")])  # was 'not found'
def test_a_missing_heldout_manifest_stops_before_any_work(tiny_model_dir, manifest, tmp_path, capsys, heldout,
                                                          message):
    fails_with(capsys, stage3(tiny_model_dir, manifest, tmp_path / "out", "--heldout", str(tmp_path / heldout)),
               message)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_stages_train_on_a_gpu_in_bfloat16_with_checkpointing(tiny_model_dir, manifest, tmp_path):
    common = ["--manifest", str(manifest), "--batch-size", "2", "--steps", "8", "--device", "cuda",
              "--gradient-checkpointing"]
    assert main(["train", "stage1", "--model", str(tiny_model_dir), "--out", str(tmp_path / "s1"), *common]) == 0
    assert main(["train", "stage2", "--model", str(tmp_path / "s1" / "model"), "--out", str(tmp_path / "s2"),
                 "--unit-vocab", "30", *common]) == 0
    for stage in ("s1", "s2"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_process_that_writes_nothing_leaves_out_to_the_one_that_writes(tmp_path, monkeypatch):
    """Under torchrun only process 0 writes; another one that ended first removed the still-empty
    OUT, and process 0's save then failed (FileNotFoundError). An OUT the run made goes only on a
    failure, and only in process 0."""
    from echox.train import stages

    def ended_without_writing(name, options):
        options.out.mkdir()  # as prepare() makes it
        return {}
    monkeypatch.setattr(stages, "trained_stage", ended_without_writing)
    options = SimpleNamespace(out=tmp_path / "out")
    monkeypatch.setenv("RANK", "1")
    assert stages.run_stage("stage2", options) == {} and (tmp_path / "out").is_dir()

    def failed(name, options):
        options.out.mkdir()
        raise EchoXError("a bad line")
    monkeypatch.setattr(stages, "trained_stage", failed)
    for rank, kept in (("1", True), ("0", False)):
        monkeypatch.setenv("RANK", rank)
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / "out").rmdir()
        with pytest.raises(EchoXError):
            stages.run_stage("stage2", options)
        assert (tmp_path / "out").exists() == kept


def test_a_unit_language_smaller_than_asked_says_so(tiny_model_dir, manifest, tmp_path, capsys):
    """--unit-vocab 1000 made a table of the few tokens the manifest holds without a word."""
    assert stage2(tiny_model_dir, manifest, tmp_path, "--steps", "1", "--unit-vocab", "1000") == 0
    made = json.loads((tmp_path / "model" / "config.json").read_text())["unit_vocab_size"]
    assert made < 1000 and (f"the manifest's units make {made} unit tokens (every value seen and every merge that "
                            f"repeats), fewer than --unit-vocab 1000") in capsys.readouterr().out


def test_a_lora_rank_beyond_the_llms_width_is_refused_before_any_work(tiny_model_dir, manifest, tmp_path, capsys,
                                                                       monkeypatch):
    """It was taken: 100000 on the 64-wide tiny model took 34 s a step, and adds nothing past 64."""
    monkeypatch.setattr("echox.train.stages.load_whisper", lambda *a, **k: pytest.fail("Whisper ran first"))
    code = main(["train", "stage1", "--manifest", str(manifest), "--model", str(tiny_model_dir), "--out",
                 str(tmp_path / "out"), "--batch-size", "2", "--lora-rank", "65"])
    fails_with(capsys, code, "LoRA rank must be from 1 to the LLM's width 64, got 65")
