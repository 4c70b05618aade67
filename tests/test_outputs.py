"""Output files and folders: written whole or not at all, beside their targets."""

import os
import stat
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


def _wav_bytes(tmp_path, samples):
    from echox.audio import write_wav
    write_wav(tmp_path / "regular.wav", samples)
    return (tmp_path / "regular.wav").read_bytes()


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    """Renaming a file over a FIFO (or /dev/null, as root) replaced the node; a reader got nothing."""
    import torch

    from echox.audio import write_wav
    from echox.outputs import check_output_file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    check_output_file(fifo, False, "--output")  # nothing is replaced, so no --overwrite is needed
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a reader, so the writer's open does not block
    samples = torch.linspace(-0.5, 0.5, 1000)
    write_wav(fifo, samples, overwrite=True)
    received = os.read(reader, 1 << 16)
    os.close(reader)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and received == _wav_bytes(tmp_path, samples)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "regular.wav"]  # no temporary file left


def test_a_link_to_a_device_stays_a_link(tmp_path):
    """`--output /dev/stdout --overwrite` renamed a file over the /dev/stdout link (here: a link to /dev/null)."""
    import torch

    from echox.audio import write_wav
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    write_wav(link, torch.zeros(100), overwrite=True)
    with atomic_file(link) as temporary:
        temporary.write_text("{}")
    assert link.is_symlink() and stat.S_ISCHR(link.stat().st_mode) and list(tmp_path.iterdir()) == [link]


def test_a_link_to_a_file_writes_its_target_and_stays_a_link(tmp_path):
    """The rename onto `answer.wav -> takes/answer.wav` replaced the link with a file and left the
    take as it was."""
    takes = tmp_path / "takes"
    takes.mkdir()
    (takes / "answer.wav").write_text("old take")
    link = tmp_path / "answer.wav"
    link.symlink_to(takes / "answer.wav")
    with atomic_file(link) as temporary:
        temporary.write_text("new take")
    assert link.is_symlink() and (takes / "answer.wav").read_text() == "new take"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["answer.wav", "answer.wav", "takes"]  # no temporary left
    dangling = tmp_path / "new.wav"
    dangling.symlink_to(takes / "new.wav")  # a link to a file still to be made: made where it points
    with atomic_file(dangling) as temporary:
        temporary.write_text("first take")
    assert dangling.is_symlink() and (takes / "new.wav").read_text() == "first take"


def test_a_block_device_is_refused(tmp_path):
    """Taken for a stream, a disk got the WAV written over its start, as root without --overwrite."""
    import torch

    from echox.audio import write_wav
    from echox.outputs import check_output_file
    disk = tmp_path / "disk"
    try:  # a node of a local-use device number: stat tells its kind, and nothing here opens it
        os.mknod(disk, stat.S_IFBLK | 0o600, os.makedev(240, 0))
    except PermissionError:
        pytest.skip("making a device node needs root")
    for check in (lambda: check_output_file(disk, True, "--output"),
                  lambda: write_wav(disk, torch.zeros(100), overwrite=True)):
        with pytest.raises(EchoXError, match="is a block device .a disk or partition., not a file to write into"):
            check()
    assert stat.S_ISBLK(disk.lstat().st_mode) and list(tmp_path.iterdir()) == [disk]


def test_a_loop_of_links_is_one_clear_error(tmp_path):
    from echox.outputs import check_output_file
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    for check in (lambda: check_output_file(tmp_path / "a.wav", True, "--output"),
                  lambda: atomic_file(tmp_path / "a.wav").__enter__()):
        with pytest.raises(EchoXError, match="a.wav: is a symbolic link that leads round in a loop"):
            check()


def test_a_forced_exit_leaves_no_temporary_beside_the_users_files(tmp_path, monkeypatch):
    """A second Ctrl-C ends the process with os._exit, which runs no `finally`: a WAV or model being
    written left its hidden temporary name behind."""
    from echox import ctrl_c
    exits = []
    monkeypatch.setattr(ctrl_c.os, "_exit", exits.append)  # the process goes on, so the test can look
    with pytest.raises(EchoXError):  # what is left of the write fails: its temporary is gone
        with atomic_file(tmp_path / "a.wav") as temporary, atomic_folder(tmp_path / "model") as folder:
            temporary.write_text("half a WAV")
            (folder / "config.json").write_text("{")
            ctrl_c.exit_at_once(130)
            assert exits == [130] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_a_replaced_file_keeps_its_permissions(tmp_path, mode):
    """The new file came with the umask's mode: a private 0600 file became world-readable."""
    target = tmp_path / "answer.wav"
    target.write_bytes(b"old")
    target.chmod(mode)
    with atomic_file(target) as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == mode


def test_written_models_are_readable_like_any_new_file(tmp_path):
    """safetensors makes its files 0600 whatever the umask: a tiny, converted or trained model's
    shards could not be read by another account, while config.json beside them could."""
    from echox.cli import main
    assert main(["tiny", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert main(["convert", str(tmp_path / "tiny" / "EchoX-tiny"), str(tmp_path / "vocoder.safetensors")]) == 0
    usual = stat.S_IMODE((tmp_path / "tiny" / "EchoX-tiny" / "config.json").stat().st_mode)
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 10 and all(stat.S_IMODE(path.stat().st_mode) == usual for path in written)
