"""The manifest (clear errors by line), length bucketing, process shares and padding."""

import json

import pytest
import torch

from echox.errors import EchoXError
from echox.train.batching import batch_at, bucketed_batches, local_share, pad_rows
from echox.train.manifest import read_manifest

GOOD = {"audio": "a.wav", "transcript": "what is it", "response": "it is blue.", "response_units": [3, 1, 4]}


def write_lines(tmp_path, lines):
    (tmp_path / "a.wav").write_bytes(b"")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_a_good_manifest(tmp_path):
    examples = read_manifest(write_lines(tmp_path, [GOOD, "", GOOD | {"response_units": None}]))
    assert [e.line for e in examples] == [1, 3]
    assert examples[0].audio == tmp_path / "a.wav"  # relative to the manifest's folder
    assert examples[0].response_units == (3, 1, 4) and examples[1].response_units is None


@pytest.mark.parametrize("bad, message", [
    ("{not json", "m.jsonl:2: not valid JSON"),
    ({"audio": "a.wav", "transcript": "x"}, "m.jsonl:2: field 'response' must be a non-empty string"),
    (GOOD | {"audio": "missing.wav"}, "m.jsonl:2: audio file"),
    (GOOD | {"response_units": [1, 1000]}, "m.jsonl:2: 'response_units' must be"),
    (GOOD | {"response_units": "1 2"}, "m.jsonl:2: 'response_units' must be"),
    ([1, 2], "m.jsonl:2: expected a JSON object"),
])
def test_bad_lines_are_named(tmp_path, bad, message):
    with pytest.raises(EchoXError, match=message):
        read_manifest(write_lines(tmp_path, [GOOD, bad]))


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = write_lines(tmp_path, [GOOD])
    path.write_bytes(path.read_bytes() + json.dumps(GOOD).encode() + b"\xff\n")
    with pytest.raises(EchoXError, match="m.jsonl:2: not UTF-8 text"):  # was a UnicodeDecodeError
        read_manifest(path)


def test_a_manifest_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    path = write_lines(tmp_path, [GOOD])

    def denied(self):  # as for a file without read permission (the tests may run as root, who reads anyway)
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(EchoXError, match="m.jsonl: cannot be read \\(Permission denied\\)"):
        read_manifest(path)


def test_units_required_where_a_stage_trains_on_them(tmp_path):
    with pytest.raises(EchoXError, match="m.jsonl:2: this stage needs 'response_units'"):
        read_manifest(write_lines(tmp_path, [GOOD, {k: v for k, v in GOOD.items() if k != "response_units"}]),
                      need_units=True)


def test_buckets_hold_similar_lengths_and_cover_every_example():
    lengths = [5, 50, 7, 52, 6, 51, 8, 49]
    batches = bucketed_batches(lengths, batch_size=4, seed=0, epoch=0)
    assert sorted(map(sorted, batches)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    orders = {tuple(map(tuple, bucketed_batches(lengths, 2, seed=0, epoch=e))) for e in range(6)}
    assert len(orders) > 1  # the batch order is reshuffled between epochs


def test_steps_walk_through_whole_epochs_in_order():
    """Step s takes batch s % per-epoch of epoch s // per-epoch, so each epoch draws every example
    (the last batch too: 9 examples in batches of 2 are 5 per epoch), reshuffled from epoch to epoch.
    A resumed run, which starts at its saved step, sees the same batches as an unbroken one."""
    lengths, size = [5, 50, 7, 52, 6, 51, 8, 49, 30], 2
    steps = [batch_at(s, lengths, size, seed=3) for s in range(10)]
    epochs = [bucketed_batches(lengths, size, seed=3, epoch=e) for e in (0, 1)]
    assert steps == epochs[0] + epochs[1] and len(epochs[0]) == 5
    for epoch in epochs:
        assert set().union(*map(set, epoch)) == set(range(len(lengths)))
    assert epochs[0] != epochs[1]


def test_a_short_last_batch_is_filled():
    batches = bucketed_batches([1, 2, 3, 4, 5], batch_size=2, seed=0, epoch=0)
    assert all(len(b) == 2 for b in batches)


def test_process_shares_split_the_global_batch():
    batch = [7, 3, 9, 1]
    assert local_share(batch, 0, 2) + local_share(batch, 1, 2) == batch


def test_padding_keeps_rows_and_marks_them():
    padded, mask = pad_rows([torch.ones(2, 3), torch.full((4, 3), 2.0)])
    assert padded.shape == (2, 4, 3)
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    assert padded[0, 2:].abs().sum() == 0 and (padded[1] == 2).all()
