"""Safetensors checkpoints: a header-only index over one file or a sharded folder.

Nothing is read until a tensor is asked for, and then only that tensor (the files are memory
mapped), so loading a model one tensor at a time keeps host memory near the model's size.
Every module describes the released key names and shapes it needs as a *layout*
(`{key: shape}`); `Checkpoint.take` checks a layout against the files and reports the first
missing key or shape mismatch by name, and `Checkpoint.check_fully_used` reports keys no
module claimed.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import read_json
from .errors import EchoXError
from .outputs import NEW_FILE_MODE

Layout = dict[str, tuple[int, ...]]
INDEX_NAME = "model.safetensors.index.json"
VARIANT_FILE = re.compile(r"model\.[^.]+?(-\d+-of-\d+)?\.safetensors")  # model.<variant>[-k-of-n].safetensors
# A checkpoint's fingerprint reads this many evenly spaced pieces of each file, and a file of at most
# their total size whole: 16 MiB a file, so a 16 GB model is known in well under a second from an
# SSD, and a fine-tune that changes any 16 MiB stretch of weights is told apart from its base.
FINGERPRINT_PIECES, FINGERPRINT_PIECE_BYTES = 256, 64 * 1024
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")  # safetensors' names of the dtypes read


def embedding_table(count: int, dim: int) -> nn.Embedding:
    """nn.Embedding(count, dim). Built on the meta device (under `torch.device("meta")`, to be
    loaded) it skips the random init: torch's meta `normal_` imports torch._dynamo on first use,
    about 2 s of every engine load that nothing else needs."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(count, dim, _weight=torch.empty(count, dim))
    return nn.Embedding(count, dim)


def _open(path: Path):
    if path.exists() and not (path.is_file() or path.is_dir()):  # opening a FIFO would wait for a writer
        raise EchoXError(f"{path}: not a regular file")
    try:  # safetensors reports a file it may not read as "no such device": ask the OS first
        with path.open("rb"):
            pass
    except OSError as e:
        raise EchoXError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise EchoXError(f"{path}: not a readable safetensors file ({e})") from None


def _index_weight_map(index: Path) -> dict[str, Path]:
    """The index's tensor name -> shard file, each shard inside the index's own folder and present."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EchoXError(f"{index}: 'weight_map' must map tensor names to shard file names")
    # Names are checked, not resolved paths: a Hugging Face cache links its shards to blobs elsewhere.
    outside = sorted({name for name in weight_map.values() if Path(name).is_absolute() or ".." in Path(name).parts})
    if outside:
        raise EchoXError(f"{index}: names shards outside the model folder: {', '.join(outside)}")
    missing = sorted({name for name in weight_map.values() if not (index.parent / name).exists()})
    if missing:
        raise EchoXError(f"{index}: lists shards that are missing: {', '.join(missing)}")
    return {key: index.parent / name for key, name in weight_map.items()}


class Checkpoint:
    """Key -> file index of a safetensors checkpoint (a file, or a folder with or without an index).

    A folder without an index holds its model as `model*.safetensors` (Hugging Face's names) when it
    has such files; other safetensors beside them, such as a converted vocoder, are not part of it.
    Every tensor lives in exactly one file, and with an index in the shard the index names."""

    def __init__(self, path: Path | str):
        path = Path(path)
        self.source = path
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        index = path / INDEX_NAME
        placed = _index_weight_map(index) if path.is_dir() and index.is_file() else None
        for file in sorted(set(placed.values())) if placed is not None else self._files(path):
            self._read_header(file)
        if placed is not None:
            self._check_placement(placed, index)
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def _read_header(self, file: Path):
        handle = _open(file)
        for key in handle.keys():
            # Two copies of a tensor (a stale model.safetensors beside the shards, a backup file) would
            # leave which one loads to the order of the file names: refuse, naming both.
            if key in self._file_of:
                raise EchoXError(f"{key!r} is stored twice, in {self._file_of[key]} and in {file}: "
                                 "remove the stale copy")
            tensor_slice = handle.get_slice(key)
            self._file_of[key] = file
            self._shape[key] = tuple(tensor_slice.get_shape())
            self._dtype[key] = tensor_slice.get_dtype()

    def _check_placement(self, placed: dict[str, Path], index: Path):
        """Every tensor the index lists is in the shard it names."""
        for key, file in placed.items():
            if key not in self._file_of:
                raise EchoXError(f"{file}: missing tensor {key!r} (the index places it in this shard)")
            if self._file_of[key] != file:
                raise EchoXError(f"{index}: places {key!r} in {file.name}, but it is stored in "
                                 f"{self._file_of[key].name}")

    @staticmethod
    def _files(path: Path) -> list[Path]:
        """The files of a checkpoint without an index: the file itself, or the folder's safetensors."""
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise EchoXError(f"{path}: " + ("not a regular file" if path.exists() else "no such file or folder"))
        models = sorted(path.glob("model*.safetensors"))
        # Hugging Face variants (model.fp32-00001-of-00002.safetensors beside model.safetensors, as
        # openai/whisper-large-v3 ships) hold the same tensors again: read them only if nothing else.
        plain = [file for file in models if not VARIANT_FILE.fullmatch(file.name)]
        files = plain or models or sorted(path.glob("*.safetensors"))
        if not files:
            raise EchoXError(f"{path}: no *.safetensors weights in this folder")
        return files

    def fingerprint(self) -> str:
        """"sha256 <16 hex digits>" of the weights' files: each one's size and a sample of its bytes
        (every byte of a small file). It names the weights, not where they are: a copied or moved
        model has the same fingerprint."""
        digest = hashlib.sha256()
        for file in sorted(set(self._file_of.values()), key=lambda f: f.name):
            size = file.stat().st_size
            digest.update(f"{file.name} {size}\n".encode())
            whole = size <= FINGERPRINT_PIECES * FINGERPRINT_PIECE_BYTES
            starts = [0] if whole else [i * (size - FINGERPRINT_PIECE_BYTES) // (FINGERPRINT_PIECES - 1)
                                        for i in range(FINGERPRINT_PIECES)]
            with open(file, "rb") as handle:
                for start in starts:
                    handle.seek(start)
                    digest.update(handle.read(size if whole else FINGERPRINT_PIECE_BYTES))
        return f"sha256 {digest.hexdigest()[:16]}"

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        self._require(key)
        return self._shape[key]

    def matrix_shape(self, key: str) -> tuple[int, int]:
        """(rows, columns) of a weight matrix, read off its header to size a config before any layout
        is checked: a tensor stored with another number of dimensions is named here."""
        shape = self.shape(key)
        if len(shape) != 2:
            raise EchoXError(f"{self._file_of[key]}: {key!r} has shape {list(shape)}, but it is a weight matrix "
                             "(2 dimensions)")
        return shape

    def stored_dtype(self) -> str:
        """The dtype most tensors are stored in (e.g. 'BF16')."""
        names = list(self._dtype.values())
        return max(set(names), key=names.count)

    def _require(self, key: str):
        if key not in self._file_of:
            raise EchoXError(f"{self.source}: missing tensor {key!r}")

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, cast and moved, in memory of its own: a copy, not a view of the file's memory
        map, which would let a shard rewritten on disk change (or, truncated, crash with SIGBUS) the
        running model. One tensor at a time, so host memory grows by one tensor per call."""
        tensor = self.stored(key)
        return tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)  # a no-op .to() returns the view

    def stored(self, key: str) -> torch.Tensor:
        """The tensor as stored, a read-only view of the file's memory map: for writing it straight
        out again (an export would otherwise hold a private copy of the whole model)."""
        self._require(key)
        self._check_dtype(key)
        file = self._file_of[key]
        if file not in self._handles:
            self._handles[file] = _open(file)
        try:
            tensor = self._handles[file].get_tensor(key)
        except Exception as e:
            raise EchoXError(f"{file}: tensor {key!r} cannot be read ({e}); is the file truncated?") from None
        self.used.add(key)
        return tensor

    def check(self, layout: Layout, what: str):
        """Fail on the first key of `layout` that is missing, has another shape, or is not floating point
        (an integer or bool tensor would be cast to float without a word)."""
        for key, shape in layout.items():
            self._require(key)
            if self._shape[key] != tuple(shape):
                raise EchoXError(f"{self._file_of[key]}: {key!r} has shape {list(self._shape[key])}, "
                                 f"but the {what} config expects {list(shape)}")
            self._check_dtype(key)

    def _check_dtype(self, key: str):
        """Refuse integer and bool tensors (they would be cast to float without a word) and the float
        formats torch cannot cast from (F4, F6_*) or that hold scales, not weights (F8_E8M0)."""
        if self._dtype[key] not in WEIGHT_DTYPES:
            raise EchoXError(f"{self._file_of[key]}: {key!r} is stored as {self._dtype[key]}, but weights are "
                             f"floating point, one of {', '.join(WEIGHT_DTYPES)}")

    def take(self, layout: Layout, what: str, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu", strip: str = "") -> dict[str, torch.Tensor]:
        """Check `layout`, then read its tensors (keys returned without the `strip` prefix)."""
        self.check(layout, what)
        return {key.removeprefix(strip): self.get(key, dtype, device) for key in layout}

    def check_fully_used(self, layouts: list[Layout], ignore_prefixes: tuple[str, ...] = ()):
        claimed = set().union(*layouts)
        extra = [k for k in self._file_of if k not in claimed and not k.startswith(ignore_prefixes)]
        if extra:
            shown = ", ".join(sorted(extra)[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise EchoXError(f"{self.source}: unexpected tensors no part of the model uses: {shown}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path):
    """A safetensors file as the released ones are written, with a new file's usual permissions:
    safetensors makes its files 0600 whatever the umask, so a model trained or converted by one
    account could not be served by another."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, NEW_FILE_MODE)


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, shards: int):
    """Write `model-0000k-of-0000n.safetensors` files plus the index, as released checkpoints are."""
    keys = list(tensors)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {key: tensors[key].contiguous() for key in keys[k * per_shard:(k + 1) * per_shard]}
        save_safetensors(chunk, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
