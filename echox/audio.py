"""Audio in and out: any sound file or sample buffer -> 16 kHz mono float32 samples, and 16-bit WAV out.

WAV is parsed here with the standard library (RIFF chunks, PCM 8/16/24/32-bit, IEEE float
32/64-bit, WAVE_FORMAT_EXTENSIBLE), so the engine needs nothing else for the common case;
FLAC, OGG and MP3 go through `soundfile` when it is installed. Every file is downmixed to mono
(the mean of its channels) and resampled to 16 kHz with a Kaiser-windowed sinc filter.

`speech_input` is the one door for speech a user hands over (a path, a tensor or numpy array,
or a (samples, rate) pair), and `prepare_speech` the one place where files and buffers alike
are checked before any work: a sample rate in MIN_RATE..MAX_RATE (a header claiming 30 MHz
would otherwise make the resampler build gigabytes of filter table), at least one sample,
finite values within MAX_AMPLITUDE, and at most 30 s, the rest cut with a warning, because
Whisper sees at most 30 s (SPEC §2) and `log_mel` would cut silently otherwise.
"""

import contextlib
import io
import math
import numbers
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from .errors import EchoXError
from .outputs import atomic_file, is_stream

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0
KEPT_PAST_CUT_S = 1.0  # audio kept past a cut: more than the resampling filter reaches
# Telephone speech is 8 kHz and studio gear records up to 384 kHz; a rate outside these bounds is
# a corrupt header or a swapped argument.
MIN_RATE, MAX_RATE = 1000, 384000
# Float samples live in [-1, 1] (a little more after gain). Anything beyond 60 dB over full scale
# is a mistake, typically int16 values stored as floats, which would shift Whisper's log-mel.
MAX_AMPLITUDE = 1000.0
# A 2-D buffer is [channels, N] or, as soundfile and numpy users hold it, [N, channels]: the
# short side (at most this many) is the channel axis.
MAX_CHANNELS = 8
# Integer PCM as WAV stores it: value -> (value - offset) / scale, so full scale maps to [-1, 1).
PCM_SCALE = {torch.uint8: (128, 128), torch.int8: (128, 0), torch.int16: (2 ** 15, 0), torch.int32: (2 ** 31, 0)}

PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
# Magic numbers of the compressed formats soundfile reads: FLAC, Ogg, MP3 (ID3 tag or frame sync).
COMPRESSED_MAGIC = (b"fLaC", b"OggS", b"ID3")


def speech_input(audio) -> torch.Tensor:
    """Speech in any form a user may pass -> [N] float32 mono at 16 kHz: finite, non-empty, at most
    30 s (longer input is cut with a warning).

    - a path (str or os.PathLike) to a sound file (WAV; FLAC/OGG/MP3 with soundfile);
    - samples already at 16 kHz: a torch tensor or numpy array, [N], [channels, N] or [N, channels]
      (see `channels_first`), float in [-1, 1] or integer PCM (uint8, int8, int16, int32, scaled
      as WAV does);
    - a (samples, rate) pair, samples as above at `rate` Hz, an int (or integral float) in
      MIN_RATE..MAX_RATE; it is resampled.
    Anything else (bytes, lists, bool or int64 samples, ...) is refused with one EchoXError."""
    if isinstance(audio, (str, os.PathLike)):
        if not os.fspath(audio):
            raise EchoXError("audio: the path is empty")
        return load_audio(audio)
    if isinstance(audio, (bytes, bytearray)):
        raise EchoXError("audio given as bytes: pass the file's path as a str or pathlib.Path, "
                         "or its samples as a tensor")
    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise EchoXError(f"audio as a tuple must be a (samples, sample rate) pair, got {len(audio)} items")
        samples, rate = audio
        return prepare_speech(channels_first(samples), checked_rate(rate))
    return prepare_speech(channels_first(audio), SAMPLE_RATE)


def checked_rate(rate, name: str = "audio") -> int:
    """A sample rate as an int in MIN_RATE..MAX_RATE Hz; bools, strings and fractional rates are refused."""
    if isinstance(rate, numbers.Real) and not isinstance(rate, numbers.Integral) and float(rate).is_integer():
        rate = int(rate)  # 16000.0, also as a numpy float
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral):  # numpy integers are Integral
        raise EchoXError(f"{name}: the sample rate must be a whole number of Hz, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise EchoXError(f"{name}: sample rate {rate} Hz is outside the accepted {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def channels_first(samples) -> torch.Tensor:
    """A user's sample buffer (tensor or numpy array) -> [channels, N] on the CPU, in its own dtype
    (float, or integer PCM: `prepare_speech` converts what it keeps).

    Layout rule for 2-D buffers [a, b]: [channels, N] when a <= MAX_CHANNELS and a <= b, else
    [N, channels] when b <= MAX_CHANNELS (the soundfile layout); otherwise it is refused."""
    tensor = _as_tensor(samples)
    if tensor.dim() == 1:
        tensor = tensor[None]
    elif tensor.dim() == 2:
        rows, cols = tensor.shape
        if not (rows <= MAX_CHANNELS and rows <= cols):
            if cols > MAX_CHANNELS:
                raise EchoXError(f"audio: cannot tell channels from samples in shape {list(tensor.shape)} "
                                 f"(expected [N], [channels, N] or [N, channels] with at most {MAX_CHANNELS} channels)")
            tensor = tensor.T
    else:
        raise EchoXError(f"audio: samples must be [N], [channels, N] or [N, channels], got shape {list(tensor.shape)}")
    if not (tensor.dtype in PCM_SCALE or tensor.is_floating_point()):
        raise EchoXError(f"audio: samples of dtype {tensor.dtype} are not audio (expected float, or integer PCM "
                         f"as uint8, int8, int16 or int32)")
    return tensor


def _as_tensor(samples) -> torch.Tensor:
    if isinstance(samples, torch.Tensor):
        if samples.is_meta or samples.layout != torch.strided:
            raise EchoXError(f"audio: samples must be a dense tensor holding its values, got a "
                             f"{'meta' if samples.is_meta else samples.layout} tensor")
        return samples.detach().cpu()
    numpy = sys.modules.get("numpy")  # a numpy array can only exist if numpy is already imported
    if numpy is not None and isinstance(samples, numpy.ndarray):
        if samples.dtype.kind not in "biuf":
            raise EchoXError(f"audio: numpy samples of dtype {samples.dtype} are not numbers")
        return torch.from_numpy(numpy.ascontiguousarray(samples, dtype=samples.dtype.newbyteorder("=")))
    raise EchoXError(f"audio: expected a file path, a tensor or numpy array of samples, or a "
                     f"(samples, sample rate) pair; got {type(samples).__name__}")


def _to_float(tensor: torch.Tensor) -> torch.Tensor:
    """Float samples as float32; integer PCM (checked by `channels_first`) scaled to [-1, 1) as WAV stores it."""
    if tensor.dtype in PCM_SCALE:
        scale, offset = PCM_SCALE[tensor.dtype]
        return ((tensor.double() - offset) / scale).float()
    return tensor.float()


def load_audio(path: Path | str, max_seconds: float | None = MAX_SECONDS) -> torch.Tensor:
    """[N] float32 mono samples at 16 kHz; audio longer than `max_seconds` is cut, with a warning.
    A WAV file is read only as far as the cut needs (a long recording is not read whole)."""
    path = Path(path)
    recording = read_audio(path, None if max_seconds is None else max_seconds + KEPT_PAST_CUT_S)
    return prepare_speech(recording.samples, recording.rate, str(path), max_seconds, recording.seconds)


def prepare_speech(samples: torch.Tensor, rate: int, name: str = "audio",
                   max_seconds: float | None = MAX_SECONDS, source_seconds: float | None = None) -> torch.Tensor:
    """Samples [N] or [channels, N] at `rate` (float, or integer PCM) -> [N'] float32 mono at 16 kHz,
    cut to `max_seconds` (before anything else is done with them: a long buffer is not converted whole).
    `source_seconds`: the whole recording's length, when `samples` are only its head.

    The rate is checked before anything is computed from it, and the samples that reach the
    resampler (all of them, or 30 s plus the filter's reach) are checked for non-finite or absurd
    values: one NaN there would make every output sample near it NaN."""
    rate = checked_rate(rate, name)
    if samples.numel() == 0:
        raise EchoXError(f"{name}: holds no audio samples (zero length)")
    samples = samples.reshape(-1, samples.shape[-1])  # [channels, frames]
    seconds = samples.shape[1] / rate if source_seconds is None else source_seconds
    too_long = max_seconds is not None and seconds > max_seconds
    if too_long:
        warnings.warn(f"{name}: audio is {seconds:.1f} s long; only the first {max_seconds:g} s are used",
                      stacklevel=3)
        # At another rate than 16 kHz, keep one second past the cut (more than the resampling filter
        # reaches), so the kept part is exactly what resampling the whole file would give.
        reach = 0.0 if rate == SAMPLE_RATE else KEPT_PAST_CUT_S
        samples = samples[:, :math.ceil((max_seconds + reach) * rate)]
    samples = _to_float(samples)
    check_sample_values(samples, name)
    mono = resample(samples.mean(dim=0), rate, SAMPLE_RATE)
    return mono[:int(max_seconds * SAMPLE_RATE)] if too_long else mono


def check_sample_values(samples: torch.Tensor, name: str):
    """NaN or infinite samples would turn every later activation into NaN; huge ones are a unit mistake."""
    if not torch.isfinite(samples).all():
        raise EchoXError(f"{name}: holds NaN or infinite samples")
    peak = float(samples.abs().max())
    if peak > MAX_AMPLITUDE:
        raise EchoXError(f"{name}: sample magnitude {peak:g} is absurd; float samples belong in [-1, 1] "
                         f"(at most {MAX_AMPLITUDE:g} is accepted; for int16 values divide by 32768)")


class Recording(NamedTuple):
    samples: torch.Tensor  # [channels, frames] float32 in [-1, 1]: the file's, or its head
    rate: int  # the file's own sample rate
    seconds: float  # the whole file's length


# A pipe or device (`--input /dev/stdin`) cannot be read from the middle: it is read whole, up to this.
MAX_STREAM_BYTES = 512 << 20


def read_audio(path: Path, head_seconds: float | None = None) -> Recording:
    """The file's own samples and sample rate; of a WAV file only the first `head_seconds` are read."""
    if path.is_dir():
        raise EchoXError(f"{path}: is a folder, not an audio file")
    if not path.exists():
        raise EchoXError(f"{path}: audio file not found")
    if path.is_file():
        head, source = file_bytes(path, 12), path
    else:
        data = file_bytes(path, MAX_STREAM_BYTES + 1)
        if len(data) > MAX_STREAM_BYTES:
            raise EchoXError(f"{path}: a pipe or device with more than {MAX_STREAM_BYTES >> 20} MiB of audio; "
                             f"save it to a file first")
        head, source = data[:12], io.BytesIO(data)
    if not head:
        raise EchoXError(f"{path}: the file is empty")
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return read_wav(path, head_seconds, source)
    samples, rate = read_with_soundfile(path, head, source)
    return Recording(samples, rate, samples.shape[1] / rate)


def file_bytes(path: Path, limit: int = -1) -> bytes:
    """The file's first `limit` bytes (all by default); a permission or I/O error is named, not raised raw."""
    try:
        with path.open("rb") as f:
            return f.read(limit)
    except OSError as e:
        raise EchoXError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_with_soundfile(path: Path, head: bytes, source: Path | BinaryIO) -> tuple[torch.Tensor, int]:
    looks_compressed = head.startswith(COMPRESSED_MAGIC) or (len(head) > 1 and head[0] == 0xFF
                                                             and head[1] & 0xE0 == 0xE0)
    try:
        import soundfile
    except ImportError:
        if looks_compressed:
            raise EchoXError(f"{path}: reading FLAC/OGG/MP3 needs the soundfile package "
                             f"(pip install soundfile), or convert the file to WAV") from None
        raise EchoXError(f"{path}: not a WAV file (expected a RIFF/WAVE header; "
                         f"pip install soundfile to read FLAC, OGG or MP3)") from None
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)  # [frames, channels]
    except Exception as e:  # libsndfile reports corrupt and unknown files with its own error types
        reason = str(e).split(": ", 1)[-1] if str(e).startswith("Error opening") else e  # what, not where:
        raise EchoXError(f"{path}: not a readable audio file ({reason})") from None  # `path` names it
    return torch.from_numpy(data.T.copy()), int(rate)


# ---- WAV --------------------------------------------------------------------------------------

# A WAV writer that cannot seek back (to a pipe) leaves the data size it could not know: ffmpeg at
# 0xFFFFFFFF, sox near 0x7ffff000 (rounded to its frame size). A data chunk that declares at least
# this much but runs past the end of the file takes the audio up to the end.
UNKNOWN_DATA_SIZE = 0x7FFF0000


def riff_chunks(f: BinaryIO, file_size: int, path: Path) -> dict[bytes, tuple[int, int]]:
    """Where the chunks after the 12-byte RIFF/WAVE header are: id -> (offset, size) of its body (the
    first of each id wins). Only the 8-byte chunk headers are read."""
    chunks: dict[bytes, tuple[int, int]] = {}
    pos = 12
    while pos + 8 <= file_size:
        f.seek(pos)
        chunk_id, size = struct.unpack("<4sI", f.read(8))
        if chunk_id == b"data" and size >= UNKNOWN_DATA_SIZE and pos + 8 + size > file_size:  # written to a pipe
            size = file_size - pos - 8
        if pos + 8 + size > file_size:
            if b"fmt " in chunks and b"data" in chunks:  # bytes after the audio (an ID3 tag, a pad byte a
                break  # writer left out): not a chunk of ours
            raise EchoXError(f"{path}: truncated WAV file: chunk {chunk_id.decode('latin-1')!r} declares "
                             f"{size} bytes but only {file_size - pos - 8} follow")
        chunks.setdefault(chunk_id, (pos + 8, size))
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return chunks


def wav_format(fmt: bytes, path: Path) -> tuple[int, int, int, int]:
    """(format code, channels, sample rate, bits per sample) from a `fmt ` chunk."""
    if len(fmt) < 16:
        raise EchoXError(f"{path}: corrupt WAV file: the 'fmt ' chunk is {len(fmt)} bytes, expected at least 16")
    code, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if code == EXTENSIBLE:
        if len(fmt) < 40:
            raise EchoXError(f"{path}: corrupt WAV file: WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is too short")
        code = struct.unpack_from("<H", fmt, 24)[0]  # the first two bytes of the SubFormat GUID
    if channels == 0 or rate == 0 or bits == 0:
        raise EchoXError(f"{path}: corrupt WAV file: {channels} channels of {bits} bits at {rate} Hz")
    if block_align != channels * ((bits + 7) // 8):
        raise EchoXError(f"{path}: corrupt WAV file: block align {block_align} does not match "
                         f"{channels} channels of {bits} bits")
    return code, channels, rate, bits


def decode_samples(raw: bytes, code: int, bits: int, path: Path) -> torch.Tensor:
    """Interleaved little-endian samples -> float32 in [-1, 1] (integers scaled by 2^(bits-1))."""
    buffer = bytearray(raw)  # frombuffer needs a writable buffer to avoid a warning
    if code == IEEE_FLOAT and bits in (32, 64):
        return torch.frombuffer(buffer, dtype=torch.float32 if bits == 32 else torch.float64).float()
    if code != PCM or bits not in (8, 16, 24, 32):
        raise EchoXError(f"{path}: unsupported WAV encoding (format code {code:#06x}, {bits} bits); "
                         f"expected PCM 8/16/24/32-bit or IEEE float 32/64-bit")
    if bits == 8:  # 8-bit WAV is unsigned, centred on 128
        return (torch.frombuffer(buffer, dtype=torch.uint8).float() - 128) / 128
    if bits == 24:
        triples = torch.frombuffer(buffer, dtype=torch.uint8).view(-1, 3).int()
        value = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        value = value - ((value & 0x800000) << 1)  # sign-extend bit 23
        return value.double().div(2 ** 23).float()
    dtype = torch.int16 if bits == 16 else torch.int32
    return torch.frombuffer(buffer, dtype=dtype).double().div(2 ** (bits - 1)).float()


def read_wav(path: Path, head_seconds: float | None, source: Path | BinaryIO) -> Recording:
    """`source`: the file, or its bytes read already (from a pipe); `path` names it in errors."""
    try:
        with (path.open("rb") if isinstance(source, Path) else contextlib.nullcontext(source)) as f:
            chunks = riff_chunks(f, f.seek(0, os.SEEK_END), path)
            if b"fmt " not in chunks:
                raise EchoXError(f"{path}: corrupt WAV file: no 'fmt ' chunk")
            if b"data" not in chunks:
                raise EchoXError(f"{path}: corrupt WAV file: no 'data' chunk")
            fmt_at, fmt_size = chunks[b"fmt "]
            f.seek(fmt_at)
            code, channels, rate, bits = wav_format(f.read(min(fmt_size, 64)), path)  # 40 bytes at most are used
            data_at, data_size = chunks[b"data"]
            if not data_size:
                raise EchoXError(f"{path}: the file holds no audio samples (zero length)")
            frame_bytes = channels * ((bits + 7) // 8)
            if data_size % frame_bytes:
                raise EchoXError(f"{path}: truncated WAV file: {data_size} data bytes is not a whole number "
                                 f"of {frame_bytes}-byte frames")
            frames = data_size // frame_bytes
            kept = frames if head_seconds is None else min(frames, math.ceil(head_seconds * rate))
            f.seek(data_at)
            raw = f.read(kept * frame_bytes)
    except OSError as e:
        raise EchoXError(f"{path}: cannot be read ({e.strerror or e})") from None
    samples = decode_samples(raw, code, bits, path)
    return Recording(samples.view(-1, channels).T.contiguous(), rate, frames / rate)  # [channels, frames]


def write_wav(path: Path | str, samples: torch.Tensor, sample_rate: int = SAMPLE_RATE, overwrite: bool = False):
    """Write [N] mono samples as 16-bit PCM WAV, clipping to [-1, 1]; atomically (see outputs.py)."""
    path = Path(path)
    if path.exists() and not overwrite and not is_stream(path):
        raise EchoXError(f"{path}: already exists; choose another output path or allow overwriting")
    pcm = (samples.detach().float().cpu().reshape(-1).clamp(-1, 1) * 32767).round().to(torch.int16)
    payload = pcm.numpy().astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", PCM, 1, sample_rate, 2 * sample_rate, 2, 16)
    header = b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(payload)) + b"WAVE"
    with atomic_file(path) as temporary:
        temporary.write_bytes(header + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                              + b"data" + struct.pack("<I", len(payload)) + payload)


# ---- resampling --------------------------------------------------------------------------------

# The filter passes up to ROLLOFF x the lower Nyquist frequency; with ZERO_CROSSINGS sinc lobes
# per side and a Kaiser window of BETA (about 100 dB stopband), the transition band is about
# 13% of the cutoff wide, so it ends below the new Nyquist (little aliasing) and the passband
# stays flat to 1e-5 up to about 0.86 x Nyquist.
ROLLOFF = 0.92
ZERO_CROSSINGS = 48
KAISER_BETA = 10.0
# Common rate pairs have few output phases (44.1 -> 16 kHz: 160), so one filter per phase is
# tabulated and run as a strided convolution; odd pairs (44101 Hz) would need a table of
# millions of filters, so theirs are interpolated from a finer table per output sample.
MAX_TABLE = 1 << 24
CHUNK = 1 << 20  # taps x outputs evaluated at once on the per-sample path (~100 MB of temporaries)
PHASE_STEPS = 1024


def windowed_sinc(t: torch.Tensor, cutoff: float, half: int) -> torch.Tensor:
    """Kaiser-windowed low-pass impulse response at offsets t (input samples), zero beyond +-half;
    its sum over unit-spaced t is ~1, so the passband gain is 1."""
    inside = (t / half).clamp(-1, 1)
    window = torch.special.i0(KAISER_BETA * torch.sqrt(1 - inside ** 2)) / torch.special.i0(torch.tensor(KAISER_BETA))
    return 2 * cutoff * torch.sinc(2 * cutoff * t) * window * (t.abs() <= half)


def resampling_plan(orig_sr: int, new_sr: int) -> tuple[int, int, float, int]:
    """(up, down, cutoff, half): output m sits at input position m * down / up; the filter passes
    `cutoff` cycles per input sample and reaches `half` input samples to each side."""
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    cutoff = ROLLOFF * min(up, down) / (2 * down)
    return up, down, cutoff, math.ceil(ZERO_CROSSINGS / (2 * cutoff))


def resample(x: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of [..., N] samples from orig_sr to new_sr: [..., ceil(N * new / orig)]."""
    orig_sr, new_sr = checked_rate(orig_sr, "resampling"), checked_rate(new_sr, "resampling")
    if orig_sr == new_sr:
        return x
    up, down, cutoff, half = resampling_plan(orig_sr, new_sr)
    lead, n = x.shape[:-1], x.shape[-1]
    out_len = -(-n * up // down)
    flat = x.reshape(-1, n).to(torch.float32)
    if up * (2 * half + down) <= MAX_TABLE:
        out = resample_polyphase(flat, up, down, cutoff, half, out_len)
    else:
        out = resample_per_sample(flat, up, down, cutoff, half, out_len)
    return out.reshape(*lead, out_len).to(x.dtype)


def resample_polyphase(x: torch.Tensor, up: int, down: int, cutoff: float, half: int, out_len: int) -> torch.Tensor:
    """x [B, N] -> [B, out_len]. Output m = q * up + p is phase p's q-th output: it reads the input
    window starting at q * down - half, at fractional offset p * down / up past its reference point."""
    taps = 2 * half + down
    offset = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    t = offset + half - torch.arange(taps, dtype=torch.float64)[None, :]  # [up, taps]
    kernels = windowed_sinc(t, cutoff, half)[:, None, :].float().to(x.device)  # [up, 1, taps]
    rows = -(-out_len // up)  # outputs per phase
    padded = torch.nn.functional.pad(x[:, None], (half, max(0, (rows - 1) * down + taps - x.shape[-1] - half)))
    phases = torch.nn.functional.conv1d(padded, kernels, stride=down)[:, :, :rows]  # [B, up, rows]
    return phases.transpose(1, 2).reshape(x.shape[0], rows * up)[:, :out_len]


def resample_per_sample(x: torch.Tensor, up: int, down: int, cutoff: float, half: int, out_len: int) -> torch.Tensor:
    """x [B, N] -> [B, out_len] for rate pairs with too many phases to tabulate exactly: the filter is
    tabulated at PHASE_STEPS fractional offsets and linearly interpolated (error ~1e-7)."""
    taps = torch.arange(1 - half, half + 1)  # input offsets around floor(position)
    grid = torch.arange(PHASE_STEPS + 1, dtype=torch.float64)[:, None] / PHASE_STEPS
    table = windowed_sinc(grid - taps, cutoff, half).float().to(x.device)  # [PHASE_STEPS + 1, taps]
    padded = torch.nn.functional.pad(x, (half, half + 1))
    step = max(1, CHUNK // taps.numel())
    chunks = []
    for start in range(0, out_len, step):
        position = torch.arange(start, min(start + step, out_len), dtype=torch.float64) * down / up
        whole = position.floor()
        fraction = (position - whole) * PHASE_STEPS
        row = fraction.floor().long()
        mix = (fraction - row).float()[:, None].to(x.device)
        weights = table[row] * (1 - mix) + table[row + 1] * mix  # [M, taps]
        index = (whole.long()[:, None] + taps + half).to(x.device)  # [M, taps], into `padded`
        chunks.append((padded[:, index] * weights).sum(-1))  # [B, M]
    return torch.cat(chunks, dim=1)
