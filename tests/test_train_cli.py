"""`echox train stageN`: one error line for user mistakes, nothing of theirs overwritten, and a
resumed run that ends exactly where an uninterrupted one does."""

import json

import pytest
import torch

from echox.audio import write_wav
from echox.checkpoint import open_model_folder
from echox.cli import demo_question, main
from echox.echo import EchoVocabulary
from echox.train.manifest import write_manifest
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


def test_an_existing_model_is_not_overwritten(tiny_model_dir, manifest, tmp_path, capsys):
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "mine.txt").write_text("keep")
    fails_with(capsys, stage2(tiny_model_dir, manifest, tmp_path / "out"), "already exists")
    assert (tmp_path / "out" / "model" / "mine.txt").read_text() == "keep"


def test_resuming_ends_where_an_uninterrupted_run_ends(tiny_model_dir, manifest, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert stage2(tiny_model_dir, manifest, straight, "--steps", "4") == 0
    assert stage2(tiny_model_dir, manifest, resumed, "--steps", "2") == 0
    assert stage2(tiny_model_dir, manifest, resumed, "--steps", "4", "--resume") == 0
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
