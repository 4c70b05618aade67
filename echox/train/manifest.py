"""The training manifest: JSONL, one conversation turn a line.

    {"audio": "q/0001.wav", "transcript": "what colour is the sky",
     "response": "The sky is blue.", "response_units": [12, 845, 3, ...]}

`audio` is the spoken question (a path, relative to the manifest's folder unless absolute),
`transcript` what was said (stage I's CTC target), `response` the answer text (stage I's CE
target, stage II's and III's decoder text), and the optional `response_units` the HuBERT units
of the spoken answer, as an offline pipeline extracts them (stage II's targets). Every problem is
reported with the manifest's name and line number, an unreadable audio file included, before any
model loads (rather than when Whisper reaches that line, perhaps hours into preparing a corpus).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..audio import check_sample_values, read_audio
from ..errors import EchoXError
from .units import HUBERT_UNITS


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line in the manifest, for messages
    audio: Path
    transcript: str
    response: str
    response_units: tuple[int, ...] | None = None


def _text_field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise EchoXError(f"{where}: field {name!r} must be a non-empty string")
    return value


def _units_field(record: dict, where: str) -> tuple[int, ...] | None:
    units = record.get("response_units")
    if units is None:
        return None
    if (not isinstance(units, list) or not units
            or not all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u < HUBERT_UNITS for u in units)):
        raise EchoXError(f"{where}: 'response_units' must be a non-empty list of integers 0..{HUBERT_UNITS - 1}")
    return tuple(units)


def parse_line(text: str, line: int, manifest: Path) -> Example:
    where = f"{manifest}:{line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise EchoXError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise EchoXError(f"{where}: expected a JSON object with audio, transcript, response")
    audio = Path(_text_field(record, "audio", where))
    audio = audio if audio.is_absolute() else manifest.parent / audio
    if not audio.is_file():
        raise EchoXError(f"{where}: audio file {audio} not found")
    return Example(line, audio, _text_field(record, "transcript", where), _text_field(record, "response", where),
                   _units_field(record, where))


def _lines(path: Path) -> list[str]:
    """The manifest's lines, each decoded on its own so that a bad byte is reported with its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EchoXError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad = raw[e.start]
            raise EchoXError(f"{path}:{n}: not UTF-8 text (byte {bad:#04x}); save the manifest as UTF-8") from None
    return lines


def check_audio(example: Example, manifest: Path):
    """The example's audio file reads as audio and every sample is finite and in range: read whole,
    since one NaN or a float WAV in int16 units anywhere would otherwise stop training hours in."""
    try:
        recording = read_audio(example.audio)
        check_sample_values(recording.samples, str(example.audio))
    except EchoXError as e:
        raise EchoXError(f"{manifest}:{example.line}: {e}") from None


def read_manifest(path: Path | str, need_units: bool = False, need_audio: bool = False) -> list[Example]:
    """Every example of a manifest (blank lines skipped); `need_units` for the stages that train on units,
    `need_audio` for those that listen to the questions."""
    path = Path(path)
    if not path.is_file():
        raise EchoXError(f"{path}: not a file (a manifest is a JSONL file)" if path.exists()
                         else f"{path}: manifest not found")
    examples = [parse_line(text, n, path) for n, text in enumerate(_lines(path), 1) if text.strip()]
    if not examples:
        raise EchoXError(f"{path}: the manifest has no examples")
    if need_units and (missing := next((e for e in examples if e.response_units is None), None)):
        raise EchoXError(f"{path}:{missing.line}: this stage needs 'response_units' on every line")
    if need_audio:
        for example in examples:
            check_audio(example, path)
    return examples


def write_manifest(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
