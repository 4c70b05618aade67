"""Output files and folders: written whole or not at all, beside their targets."""

from pathlib import Path

import pytest

from echox.errors import EchoXError
from echox.outputs import atomic_file, atomic_folder, check_output_folder


def test_atomic_folder_replaces_an_older_folder_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_folder(target) as staging:
        (staging / "new.bin").write_text("new")
        assert not (target / "new.bin").exists()  # nothing visible until the block completes
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old copy and the staging folder are gone


def test_interrupted_atomic_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "kept.bin").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as staging:
            (staging / "half.bin").write_text("partial")
            raise KeyboardInterrupt
    assert (target / "kept.bin").read_text() == "old" and not (target / "half.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_errors_become_one_clear_error(tmp_path):
    with pytest.raises(EchoXError, match="missing/x.json: cannot be written"):
        with atomic_file(tmp_path / "missing" / "x.json") as temporary:
            temporary.write_text("{}")
    with pytest.raises(EchoXError, match="cannot write the cache there"):
        check_output_folder(Path("/proc/echox-cache/models"), "the cache")  # nobody can write in /proc
