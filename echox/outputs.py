"""Files echox writes for the user: checked writable before any work, written atomically.

A turn or a conversion can take minutes; learning only afterwards that its output cannot be
written loses the work. So each output path is checked up front by creating (and removing) a
probe file in its folder: the one test that tells the truth on read-only mounts, under /proc and
for root, where permission bits say nothing. Every write then goes to a temporary name in the
same folder and is renamed onto the target only once complete: a rename within one folder is
atomic, so an interrupted run leaves the old file (or none), never half of a new one.

A device or a pipe (`/dev/null`, `/dev/stdout`, a FIFO another program reads), or whatever file
stdout or stderr was sent to, is the one kind of target written into directly: renaming a file over
it would replace the node or link itself (as root, `--output /dev/null` turned the system's
/dev/null into a WAV), and the user asked for the bytes to go there, not for a file beside it.
"""

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from .errors import EchoXError

# The temporary names being written now. A forced exit (a second Ctrl-C: ctrl_c.exit_at_once) skips
# the `finally` that removes them, and would leave them hidden beside the user's files.
UNFINISHED: set[Path] = set()

# The mode of a file this process creates: read once, at import, because reading the umask means
# setting it, for every thread at once.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK


def remove_unfinished():
    """Remove every temporary file or folder still being written (before a forced exit)."""
    for path in list(UNFINISHED):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_writable_folder(folder: Path, what: str):
    """`folder` exists and a file can be created in it."""
    if not folder.is_dir():
        raise EchoXError(f"{folder}: is a file, not a folder (needed for {what})" if folder.exists()
                         else f"{folder}: folder does not exist (needed for {what})")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".echox-probe-"):
            pass
    except OSError as e:
        raise EchoXError(f"{folder}: cannot write {what} there ({e.strerror})") from None


def is_stream(path: Path) -> bool:
    """`path` is, or links to, a character device, FIFO or socket, or the file this process's stdout
    or stderr writes to (`--output /dev/stdout > answer.wav`): something to write into, never to
    replace. A block device (a disk) is neither: see `refuse_a_disk`."""
    try:
        found = path.stat()
    except OSError:  # missing, or a dangling link: a new file is created there
        return False
    special = stat.S_ISCHR(found.st_mode) or stat.S_ISFIFO(found.st_mode) or stat.S_ISSOCK(found.st_mode)
    return special or is_open_as(path, 1) or is_open_as(path, 2)


def refuse_a_disk(path: Path):
    """A block device is refused as an output: written into, a WAV would overwrite the start of a
    disk (as root, without a word); renamed over, its node would be gone."""
    with contextlib.suppress(OSError):
        if stat.S_ISBLK(path.stat().st_mode):
            raise EchoXError(f"{path}: is a block device (a disk or partition), not a file to write into")


def is_open_as(path: Path, fd: int) -> bool:
    """`path` is the file behind file descriptor `fd`."""
    try:
        return os.path.samestat(path.stat(), os.fstat(fd))
    except OSError:  # missing, or `fd` closed
        return False


def check_output_file(path: Path, overwrite: bool, what: str):
    """`path` can take a new file: not a folder, not an existing file unless `overwrite`, in a writable
    folder; or it is a device or pipe that can be written into (its folder, such as /dev, need not be)."""
    if path.is_dir():
        raise EchoXError(f"{path}: is a folder; {what} needs a file name")
    refuse_a_disk(path)
    if is_stream(path):
        if not os.access(path, os.W_OK):
            raise EchoXError(f"{path}: cannot write {what} into it (permission denied)")
        return
    if path.exists() and not overwrite:
        raise EchoXError(f"{path}: already exists (allow overwriting, --overwrite, to replace it)")
    check_writable_folder(landing(path).parent, what)


def check_output_folder(folder: Path, what: str):
    """`folder`, or the nearest existing folder above it (where it will be created), is writable."""
    if folder.exists() and not folder.is_dir():
        raise EchoXError(f"{folder}: is a file, but {what} needs a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EchoXError(f"{existing}: is a file, so {what} {folder} cannot be created")
    check_writable_folder(existing, what)


def _temporary_name(target: Path, kind: str) -> Path:
    """A hidden name beside `target` that nothing else uses (the folder keeps its own permissions)."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` when the block succeeds and is removed
    when it fails or is interrupted; a device or pipe is yielded itself (see above). OS errors (disk
    full, read-only folder, a reader that went away) become one clear error."""
    target = landing(path)
    refuse_a_disk(target)
    temporary = target if is_stream(target) else _temporary_name(target, "tmp")
    if temporary != target:
        UNFINISHED.add(temporary)
    try:
        yield temporary
        if temporary != target:
            keep_mode(target, temporary)
            os.replace(temporary, target)
    except OSError as e:
        raise EchoXError(f"{path}: cannot be written ({e.strerror or e})") from None
    finally:
        if temporary != target:
            temporary.unlink(missing_ok=True)
            UNFINISHED.discard(temporary)


def keep_mode(old: Path, new: Path):
    """Give `new` the permissions of the file `old` it replaces: a private (0600) file stays private,
    a shared one stays readable."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(new, stat.S_IMODE(old.stat().st_mode))


def landing(path: Path) -> Path:
    """Where a write to `path` lands: a symbolic link's target, as `cp` writes it (the rename of a new
    file onto the link itself would replace the link and leave its target as it was)."""
    if not path.is_symlink() or is_stream(path):  # a link to a stream (/dev/stdout) is written through as it is
        return path
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError):  # a loop of links (RuntimeError before Python 3.13)
        raise EchoXError(f"{path}: is a symbolic link that leads round in a loop, not to a file") from None


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block succeeds it replaces `folder`
    (an older one is moved aside first, then deleted), when it fails it is deleted."""
    temporary = _temporary_name(folder, "tmp")
    UNFINISHED.add(temporary)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
        yield temporary
        if folder.exists():
            old = _temporary_name(folder, "old")
            os.replace(folder, old)  # a rename cannot replace a non-empty folder: move the old one aside
            os.replace(temporary, folder)
            shutil.rmtree(old)
        else:
            os.replace(temporary, folder)
    except OSError as e:
        raise EchoXError(f"{folder}: cannot be written ({e.strerror or e})") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        UNFINISHED.discard(temporary)
