"""`echox train demo --quick`: every stage's loss falls, stage III makes the echo decoder fed with the
LLM's hidden states predict held-out pseudo-labels better, and `echox chat` serves the saved model."""

import json
import shutil

import pytest

from echox.cli import main

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the demo speaks with espeak-ng")


def test_quick_demo_trains_all_stages_and_the_model_answers(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", "demo", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["loss"]) == {"stage1", "stage2", "stage3"}
    for stage, ends in summary["loss"].items():
        assert ends["last"] < ends["first"], stage
    accuracy = summary["heldout_unit_accuracy"]
    assert accuracy["after_stage3"] > accuracy["before_stage3"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    echo_terms = {"loss", "s2t", "cross_entropy", "ctc", "echo", "denoising", "lambda", "t2u"}
    assert all(echo_terms <= set(line) for line in lines if line["stage"] == "stage3")
    capsys.readouterr()
    first = summary["heldout_answers"][0]
    assert main(["chat", "--model", str(out / "model"), "--input", str(out / "data" / first["question"]),
                 "--output", str(tmp_path / "answer.wav"), "--greedy", "--max-new-tokens", "32"]) == 0
    printed = capsys.readouterr().out
    assert first["answer"] and first["answer"] in printed  # the CLI gives the answer the demo's engine gave
    assert (tmp_path / "answer.wav").stat().st_size > 44  # and speaks it
