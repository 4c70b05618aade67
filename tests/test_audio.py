"""Audio loading, WAV decoding, band-limited resampling and WAV writing."""

import math
import struct
import sys
import wave
from pathlib import Path

import pytest
import torch

from echox import audio
from echox.audio import load_audio, read_audio, resample, write_wav
from echox.errors import EchoXError

KSDATAFORMAT_SUFFIX = bytes.fromhex("000000001000800000aa00389b71")  # GUID tail after the format code


def wav_bytes(code: int, channels: int, rate: int, bits: int, payload: bytes, extensible: bool = False) -> bytes:
    """A WAV file built by hand, independently of echox.audio (for float and EXTENSIBLE)."""
    block = channels * bits // 8
    if extensible:
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt += struct.pack("<H", code) + KSDATAFORMAT_SUFFIX
    else:
        fmt = struct.pack("<HHIIHH", code, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 3) + b"abc\0"  # an odd-sized extra chunk, padded, to be skipped
    body += b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(rate: int, seconds: float, freq: float, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return amplitude * torch.sin(2 * math.pi * freq * t + 0.3)


# Integer ranges per width, and how the WAV standard maps them to [-1, 1).
PCM_CASES = {8: (0, 256, 128), 16: (-2 ** 15, 2 ** 15, 0), 24: (-2 ** 23, 2 ** 23, 0), 32: (-2 ** 31, 2 ** 31, 0)}


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_pcm_widths_decode_to_scaled_integers(tmp_path, bits):
    low, high, centre = PCM_CASES[bits]
    values = torch.cat([torch.tensor([low, high - 1, centre]), torch.randint(low, high, (997,))]).long()
    path = tmp_path / f"pcm{bits}.wav"
    with wave.open(str(path), "wb") as w:  # the standard library writes the reference file
        w.setnchannels(1), w.setsampwidth(bits // 8), w.setframerate(16000)
        w.writeframes(b"".join(int(v).to_bytes(bits // 8, "little", signed=bits > 8) for v in values))
    expected = (values - centre).double() / 2 ** (bits - 1)
    torch.testing.assert_close(load_audio(path).double(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("bits,extensible", [(32, False), (64, False), (32, True), (64, True)])
def test_float_and_extensible_wav(tmp_path, bits, extensible):
    x = torch.rand(2, 500, dtype=torch.float64) * 2 - 1  # [channels, frames]
    payload = x.T.contiguous().numpy().astype("<f4" if bits == 32 else "<f8").tobytes()
    path = tmp_path / "float.wav"
    path.write_bytes(wav_bytes(0x0003, 2, 16000, bits, payload, extensible))
    samples, rate, _ = read_audio(path)
    assert rate == 16000
    torch.testing.assert_close(samples.double(), x, atol=1e-7, rtol=0)
    torch.testing.assert_close(load_audio(path).double(), x.mean(0), atol=1e-7, rtol=0)  # downmix = mean


def test_extensible_pcm24_stereo(tmp_path):
    values = torch.randint(-2 ** 23, 2 ** 23, (300, 2))
    payload = b"".join(int(v).to_bytes(3, "little", signed=True) for v in values.reshape(-1))
    path = tmp_path / "x24.wav"
    path.write_bytes(wav_bytes(0x0001, 2, 16000, 24, payload, extensible=True))
    torch.testing.assert_close(load_audio(path).double(), values.double().mean(1) / 2 ** 23, atol=1e-7, rtol=0)


@pytest.mark.parametrize("rate", [44100, 22050, 8000, 48000, 44101])  # 44101: no small common factor
def test_resampler_passband_matches_analytic_tone(rate):
    out_rate = 16000
    for freq in (200.0, 0.2 * min(rate, out_rate), 0.375 * min(rate, out_rate)):
        y = resample(tone(rate, 0.5, freq).float(), rate, out_rate)
        assert y.shape == (out_rate // 2,)
        expected = tone(out_rate, 0.5, freq)
        error = (y.double() - expected)[500:-500].abs().max().item()  # away from the zero-padded edges
        assert error < 1e-3, f"{rate} Hz -> {out_rate} Hz, {freq} Hz tone: error {error:.2e}"


def test_resampler_removes_content_above_the_new_nyquist():
    """A 10 kHz tone cannot exist at 16 kHz; a naive interpolator would alias it to 6 kHz."""
    y = resample(tone(44100, 1.0, 10000.0).float(), 44100, 16000)
    assert y[500:-500].abs().max() < 1e-3


def test_interpolated_filter_path_equals_polyphase_path(monkeypatch):
    """Odd rate pairs use an interpolated filter table; on a common pair both paths must agree."""
    x = torch.randn(2, 3000)
    polyphase = resample(x, 22050, 16000)
    monkeypatch.setattr(audio, "MAX_TABLE", 0)
    torch.testing.assert_close(resample(x, 22050, 16000), polyphase, atol=1e-5, rtol=0)


def test_resampler_handles_batches_and_tiny_inputs():
    x = torch.randn(3, 2, 441)
    y = resample(x, 44100, 16000)
    assert y.shape == (3, 2, 160)
    torch.testing.assert_close(y[1, 0], resample(x[1, 0], 44100, 16000))
    assert resample(torch.ones(1), 8000, 16000).shape == (2,)


def test_load_audio_resamples_to_16k(tmp_path):
    path = tmp_path / "cd.wav"
    write_wav(path, tone(44100, 0.5, 440.0), sample_rate=44100)
    y = load_audio(path)
    assert y.dtype == torch.float32 and y.shape == (8000,)
    assert (y.double() - tone(16000, 0.5, 440.0))[300:-300].abs().max() < 2e-4  # 16-bit quantisation


def test_silent_and_very_short_audio_load(tmp_path):
    silent = tmp_path / "silent.wav"
    write_wav(silent, torch.zeros(16000))
    assert torch.equal(load_audio(silent), torch.zeros(16000))
    short = tmp_path / "short.wav"
    write_wav(short, torch.tensor([0.5]), sample_rate=8000)
    assert load_audio(short).shape == (2,)


def test_long_audio_is_cut_to_30_seconds_with_a_warning(tmp_path):
    path = tmp_path / "long.wav"
    write_wav(path, torch.randn(31 * 22050, generator=torch.Generator().manual_seed(0)) * 0.1, sample_rate=22050)
    with pytest.warns(UserWarning, match="31.0 s long; only the first 30 s"):
        y = load_audio(path)
    whole = load_audio(path, max_seconds=None)
    assert y.shape == (480000,) and whole.shape == (31 * 16000,)
    torch.testing.assert_close(y, whole[:480000], atol=1e-6, rtol=0)  # the cut does not change what is kept


def test_a_long_wav_is_read_only_as_far_as_the_cut(tmp_path):
    """A 10-minute recording took 5x its size in memory to use its first 30 s."""
    path = tmp_path / "long.wav"
    write_wav(path, torch.zeros(40 * 16000))
    head = read_audio(path, head_seconds=2.5)
    assert head.samples.shape == (1, 40000) and head.rate == 16000 and head.seconds == 40.0
    with pytest.warns(UserWarning, match="40.0 s long; only the first 30 s"):
        assert load_audio(path).shape == (480000,)


def test_write_wav_clips_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.wav"
    write_wav(path, torch.tensor([2.0, -3.0, 0.5, 0.0]))
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
    torch.testing.assert_close(load_audio(path), torch.tensor([32767, -32767, 16384, 0]) / 32768)
    with pytest.raises(EchoXError, match="already exists"):
        write_wav(path, torch.zeros(4))
    write_wav(path, torch.zeros(4), overwrite=True)
    assert torch.equal(load_audio(path), torch.zeros(4))


def _bad_files(tmp_path):
    good = wav_bytes(0x0001, 1, 16000, 16, bytes(200))
    return {
        "empty": (b"", "empty"),
        "zero_length": (wav_bytes(0x0001, 1, 16000, 16, b""), "zero length"),
        "truncated": (good[:-50], "truncated"),
        "half_frame": (wav_bytes(0x0001, 1, 16000, 16, bytes(201)), "not a whole number"),
        "no_fmt": (b"RIFF" + struct.pack("<I", 12) + b"WAVE" + b"data" + struct.pack("<I", 0), "no 'fmt '"),
        "adpcm": (wav_bytes(0x0002, 1, 16000, 16, bytes(200)), "unsupported WAV encoding"),
        "zero_rate": (wav_bytes(0x0001, 1, 0, 16, bytes(200)), "0 Hz"),
        "zero_bits": (wav_bytes(0x0001, 1, 16000, 0, bytes(200)), "0 bits"),  # block align 0 as well
        "text": (b"this is not audio at all\n" * 4, "not a WAV file|not a readable audio file"),
    }


@pytest.mark.parametrize("case", ["empty", "zero_length", "truncated", "half_frame", "no_fmt", "adpcm",
                                  "zero_rate", "zero_bits", "text"])
def test_bad_files_raise_clear_errors(tmp_path, case):
    content, message = _bad_files(tmp_path)[case]
    path = tmp_path / f"{case}.wav"
    path.write_bytes(content)
    with pytest.raises(EchoXError, match=message) as info:
        load_audio(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("unknown_size", [0xFFFFFFFF, 0x7FFFF000])  # ffmpeg's, sox's
def test_a_wav_written_to_a_pipe_reads_to_the_end(tmp_path, unknown_size):
    """ffmpeg or sox writing to a pipe cannot go back to fill in the sizes: the data runs to the end."""
    values = torch.tensor([1000, -2000, 3000, 0], dtype=torch.int16)
    whole = wav_bytes(0x0001, 1, 16000, 16, values.numpy().astype("<i2").tobytes())
    data_at = whole.index(b"data")
    streamed = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + whole[8:data_at + 4] + struct.pack("<I", unknown_size) \
        + whole[data_at + 8:]
    path = tmp_path / "piped.wav"
    path.write_bytes(streamed)
    torch.testing.assert_close(load_audio(path), values.float() / 32768, atol=0, rtol=0)


def test_bytes_after_the_audio_are_not_a_chunk(tmp_path):
    """An ID3v1 tag after the RIFF chunk."""
    values = torch.tensor([1000, -2000, 3000, 0], dtype=torch.int16)
    path = tmp_path / "tagged.wav"
    path.write_bytes(wav_bytes(0x0001, 1, 16000, 16, values.numpy().astype("<i2").tobytes()) + b"TAG" + b"\xff" * 125)
    torch.testing.assert_close(load_audio(path), values.float() / 32768, atol=0, rtol=0)


def test_an_odd_data_chunk_without_its_pad_byte_before_another_chunk(tmp_path):
    """Some writers leave out the pad byte after an odd-sized chunk: the next chunk's header is then
    read one byte late, as garbage, after the audio is found."""
    samples = bytes(range(101))  # 8-bit mono: 101 bytes
    fmt = struct.pack("<HHIIHH", 0x0001, 1, 8000, 8000, 1, 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 101) + samples \
        + b"LIST" + struct.pack("<I", 8) + b"INFOabcd"
    path = tmp_path / "unpadded.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    assert load_audio(path).shape == (202,)  # 101 samples at 8 kHz, resampled to 16 kHz


def test_a_pipe_is_read_like_a_file(tmp_path):
    """`--input /dev/stdin` or `<(ffmpeg ... -f wav -)`: the path is a pipe, which cannot seek."""
    import os
    import threading
    values = torch.tensor([1000, -2000, 3000, 0], dtype=torch.int16)
    content = wav_bytes(0x0001, 1, 16000, 16, values.numpy().astype("<i2").tobytes())
    fifo = tmp_path / "question.wav"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(content,), daemon=True)
    writer.start()
    try:
        torch.testing.assert_close(load_audio(fifo), values.float() / 32768, atol=0, rtol=0)
    finally:
        if writer.is_alive():  # the pipe was not read: open its other end, so the writer gets out
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)


def test_missing_file(tmp_path):
    with pytest.raises(EchoXError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_compressed_audio_without_soundfile_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # makes `import soundfile` fail
    path = tmp_path / "x.flac"
    path.write_bytes(b"fLaC" + bytes(100))
    with pytest.raises(EchoXError, match="pip install soundfile"):
        load_audio(path)


def test_flac_through_soundfile(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    x = tone(22050, 0.5, 300.0)
    stereo = torch.stack([x, -0.5 * x], dim=1).numpy()  # [frames, channels]
    path = tmp_path / "x.flac"
    soundfile.write(str(path), stereo, 22050, subtype="PCM_16")
    y = load_audio(path)
    assert y.shape == (8000,)
    assert (y.double() - 0.25 * tone(16000, 0.5, 300.0))[300:-300].abs().max() < 2e-4
    corrupt = tmp_path / "bad.flac"
    corrupt.write_bytes(path.read_bytes()[:60])
    with pytest.raises(EchoXError, match="not a readable audio file"):
        load_audio(corrupt)



def test_a_pipe_that_is_not_audio_is_named_without_pythons_repr():
    """Read from a pipe, the reason was 'Error opening <_io.BytesIO object at 0x7f...>: ...'."""
    import io
    pytest.importorskip("soundfile")
    with pytest.raises(EchoXError) as info:
        audio.read_with_soundfile(Path("/dev/stdin"), b"hello text\n", io.BytesIO(b"hello text\n" * 8))
    assert str(info.value) == "/dev/stdin: not a readable audio file (Format not recognised.)"


# ---- speech_input: every form of speech a user may hand over ------------------------------------

from echox.audio import speech_input  # noqa: E402


def test_speech_input_layouts_agree():
    """[N, channels] (soundfile/numpy), [channels, N], and a (samples, 16000) pair are one signal."""
    x = tone(16000, 0.5, 300.0).float()
    stereo = torch.stack([x, 0.5 * x])  # [2, N]
    expected = speech_input(stereo)
    assert torch.equal(expected, 0.75 * x)
    torch.testing.assert_close(speech_input(stereo.T.numpy()), expected, atol=0, rtol=0)
    torch.testing.assert_close(speech_input((stereo.T.contiguous(), 16000)), expected, atol=0, rtol=0)
    assert torch.equal(speech_input(x[None].T), x)  # [N, 1]


@pytest.mark.parametrize("dtype,scale,offset", [(torch.int16, 2 ** 15, 0), (torch.int32, 2 ** 31, 0),
                                                (torch.uint8, 128, 128), (torch.int8, 128, 0)])
def test_integer_pcm_is_scaled_like_wav(dtype, scale, offset):
    info = torch.iinfo(dtype)
    pcm = torch.linspace(info.min, info.max, 1000).round().to(dtype)
    expected = ((pcm.double() - offset) / scale).float()
    assert torch.equal(speech_input(pcm), expected)
    assert speech_input(pcm).abs().max() <= 1


def test_pairs_resample_and_accept_whole_rates():
    np = pytest.importorskip("numpy")
    x = tone(8000, 0.5, 300.0).float()
    reference = speech_input((x, 8000))
    assert reference.shape == (8000,)
    assert torch.equal(speech_input((x, 8000.0)), reference)
    assert torch.equal(speech_input((x.numpy(), np.int64(8000))), reference)
    assert torch.equal(speech_input((x, np.float32(8000))), reference)


@pytest.mark.parametrize("rate,message", [(True, "whole number"), ("16000", "whole number"),
                                          (16000.5, "whole number"), (None, "whole number"),
                                          (999, "outside the accepted 1000..384000 Hz"),
                                          (384001, "outside the accepted"), (0, "outside"), (-16000, "outside")])
def test_bad_sample_rates_are_refused(rate, message):
    with pytest.raises(EchoXError, match=message):
        speech_input((torch.zeros(1600), rate))


def _bad_speech():
    return {
        "nan": (torch.tensor([0.1, float("nan"), 0.2]), "NaN or infinite"),
        "inf": (torch.tensor([0.1, float("inf")]), "NaN or infinite"),
        "absurd": (torch.full((100,), 1e30), "absurd"),
        "int16_as_float": (torch.full((100,), 20000.0), "divide by 32768"),
        "empty_channels": (torch.zeros(0, 1600), "no audio samples"),
        "empty": (torch.zeros(0), "no audio samples"),
        "scalar": (torch.tensor(0.5), "got shape \\[\\]"),
        "3d": (torch.zeros(1, 2, 1600), "got shape \\[1, 2, 1600\\]"),
        "square_ish": (torch.zeros(20, 30), "cannot tell channels from samples"),
        "bool": (torch.ones(100, dtype=torch.bool), "not audio"),
        "int64": (torch.ones(100, dtype=torch.int64), "not audio"),
        "complex": (torch.ones(100, dtype=torch.complex64), "not audio"),
        "list": ([0.0, 0.1, 0.2], "got list"),
        "bytes": (b"RIFF....WAVE", "as bytes"),
        "triple": ((torch.zeros(10), 16000, 1), "pair, got 3 items"),
        "none_samples": ((None, 16000), "got NoneType"),
        "meta": (torch.zeros(100, device="meta"), "got a meta tensor"),
        "sparse": (torch.ones(100).to_sparse(), "got a torch.sparse_coo tensor"),
        "empty_path": ("", "the path is empty"),
    }


@pytest.mark.parametrize("case", list(_bad_speech()))
def test_bad_speech_is_refused_with_one_clear_error(case):
    audio, message = _bad_speech()[case]
    with pytest.raises(EchoXError, match=message):
        speech_input(audio)


@pytest.mark.parametrize("at_seconds", [30.5, 31.9])
def test_only_the_kept_30_seconds_are_checked(at_seconds):
    x = torch.zeros(16000 * 32)
    x[int(at_seconds * 16000)] = float("nan")  # past the cut (at 16 kHz nothing is resampled): never reaches the model
    with pytest.warns(UserWarning, match="only the first 30 s"):
        assert speech_input(x).shape == (480000,)


def test_a_long_integer_buffer_is_cut_before_it_is_converted(monkeypatch):
    converted = []
    to_float = audio._to_float
    monkeypatch.setattr(audio, "_to_float", lambda t: converted.append(t.numel()) or to_float(t))
    pcm = torch.randint(-2000, 2000, (48000 * 120,), dtype=torch.int16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="only the first 30 s"):
        whole = speech_input((pcm, 48000))
    assert converted == [48000 * 31]  # 30 s and the resampling filter's reach, not 2 minutes
    with pytest.warns(UserWarning, match="only the first 30 s"):
        torch.testing.assert_close(whole, speech_input((pcm[:48000 * 31], 48000)), atol=0, rtol=0)


def test_speech_input_reads_paths(tmp_path):
    path = tmp_path / "x.wav"
    write_wav(path, 0.5 * torch.ones(160))
    assert torch.equal(speech_input(path), speech_input(str(path)))
    with pytest.raises(EchoXError, match="is a folder"):
        speech_input(tmp_path)


@pytest.mark.parametrize("rate", [30_000_001, 4_294_967_295, 999])
def test_absurd_header_rates_are_refused_before_any_filter_is_built(tmp_path, monkeypatch, rate):
    def no_filter(*args):
        raise AssertionError("a resampling filter was built")
    monkeypatch.setattr(audio, "windowed_sinc", no_filter)
    path = tmp_path / "x.wav"
    header_rate_at = 24  # RIFF, size, WAVE, "fmt ", its size, format code, channels
    content = bytearray(wav_bytes(0x0001, 1, 16000, 16, bytes(4000)))
    content[header_rate_at:header_rate_at + 4] = struct.pack("<I", rate)
    path.write_bytes(bytes(content))
    with pytest.raises(EchoXError, match=f"{path}: sample rate {rate} Hz is outside"):
        load_audio(path)


def test_float_wav_with_nan_is_refused(tmp_path):
    path = tmp_path / "nan.wav"
    samples = torch.tensor([0.1, float("nan"), -0.1, 0.0], dtype=torch.float32)
    path.write_bytes(wav_bytes(0x0003, 1, 16000, 32, samples.numpy().tobytes()))
    with pytest.raises(EchoXError, match="nan.wav: holds NaN"):
        load_audio(path)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    """As a permission error comes (opening it is refused; chmod 0 would not stop root, as CI runs)."""
    path = tmp_path / "x.wav"
    write_wav(path, torch.zeros(16))
    open_path = Path.open

    def refused(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return open_path(self, *args, **kwargs)
    monkeypatch.setattr(Path, "open", refused)
    with pytest.raises(EchoXError, match=r"x.wav: cannot be read \(Permission denied\)"):
        load_audio(path)


def test_interrupted_wav_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.wav"
    write_wav(path, torch.zeros(16))
    before = path.read_bytes()

    def interrupted_write(self, data):
        self.open("wb").write(data[:10])  # half a file, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(type(path), "write_bytes", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        write_wav(path, torch.ones(1600), overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]  # no temporary left behind
