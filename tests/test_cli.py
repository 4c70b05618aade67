"""The `echox` command: a working run, and one clear line (exit 2, no traceback) per user mistake."""

import json
import shutil

import pytest

from echox.audio import write_wav
from echox.cli import demo_question, main
from echox.config import VocoderConfig, WhisperConfig
from echox.tiny import TinySpec, write_tiny_checkpoint


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    write_wav(path, demo_question(1.0))
    return path


def chat(model, *extra):
    return main(["chat", "--model", str(model), "--greedy", "--max-new-tokens", "8", "--max-units", "32",
                 *map(str, extra)])


def fails_with(capsys, code, pattern):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert pattern in err, err


def test_chat_writes_audio_and_a_complete_trace(tiny_model_dir, question, tmp_path, capsys):
    out, trace = tmp_path / "answer.wav", tmp_path / "trace.json"
    assert chat(tiny_model_dir, "--input", question, "--output", out, "--trace", trace) == 0
    captured = capsys.readouterr()
    assert "tokens" in captured.out and "whisper-tiny" in captured.err  # says which parts were used
    data = json.loads(trace.read_text())
    assert set(data) >= {"prompt_ids", "speech_frames", "tokens", "text", "scores", "segments", "timings_ms"}
    assert set(data["timings_ms"]) >= {"encoder", "adapter", "prefill", "decode_per_token", "echo_decoder",
                                       "vocoder", "time_to_first_audio", "total"}
    samples = sum(s["samples"] for s in data["segments"])
    assert out.stat().st_size == 44 + 2 * samples  # a 16-bit mono WAV of exactly the streamed samples


def test_low_latency_cuts_the_first_segment_early(tiny_model_dir, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["chat", "--model", str(tiny_model_dir), "--greedy", "--max-new-tokens", "30", "--max-units", "32",
                 "--text", "Hi", "--low-latency", "--output", str(tmp_path / "a.wav"), "--trace", str(trace)]) == 0
    first = json.loads(trace.read_text())["segments"][0]
    assert first["end"] - first["start"] < 20  # the released policy never cuts before 20 tokens


def test_long_audio_is_cut_with_a_one_line_warning(tiny_model_dir, tmp_path, capsys):
    import torch
    long = tmp_path / "long.wav"
    write_wav(long, 0.1 * torch.randn(16000 * 31, generator=torch.Generator().manual_seed(0)))
    assert chat(tiny_model_dir, "--input", long, "--output", tmp_path / "a.wav") == 0
    err = capsys.readouterr().err
    assert "echox: warning: " in err and "only the first 30 s are used" in err and "UserWarning" not in err


def test_existing_output_is_not_overwritten(tiny_model_dir, question, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    out.write_bytes(b"mine")
    fails_with(capsys, chat(tiny_model_dir, "--input", question, "--output", out), "already exists")
    assert out.read_bytes() == b"mine"


def test_missing_model_folder(tmp_path, question, capsys):
    fails_with(capsys, chat(tmp_path / "nope", "--input", question, "--output", tmp_path / "a.wav"),
               "model folder not found")


def test_incomplete_model_folder(tiny_root, tmp_path, question, capsys):
    shutil.copytree(tiny_root, tmp_path / "root")
    model = tmp_path / "root" / "EchoX-tiny"
    (model / "tokenizer.json").unlink()
    fails_with(capsys, chat(model, "--input", question, "--output", tmp_path / "a.wav"), "tokenizer.json")


def test_whisper_of_another_width(tiny_model_dir, tmp_path, question, capsys):
    other = TinySpec(whisper=WhisperConfig(num_mel_bins=80, d_model=32, num_layers=1, num_heads=2, ffn_dim=64))
    write_tiny_checkpoint(tmp_path / "other", other)
    fails_with(capsys, chat(tiny_model_dir, "--whisper", tmp_path / "other" / "whisper-tiny", "--input", question,
                            "--output", tmp_path / "a.wav"), "wrong --whisper folder")


def test_vocoder_folder_without_vocoder(tiny_model_dir, tmp_path, question, capsys):
    fails_with(capsys, chat(tiny_model_dir, "--vocoder", tmp_path, "--input", question, "--output",
                            tmp_path / "a.wav"), "no vocoder found")


def test_vocoder_of_another_unit_set(tiny_model_dir, tmp_path, question, capsys):
    small = TinySpec(vocoder=VocoderConfig(upsample_initial_channel=64, embedding_dim=32, duration_hidden=32,
                                           num_embeddings=500))
    write_tiny_checkpoint(tmp_path / "other", small)
    fails_with(capsys, chat(tiny_model_dir, "--vocoder", tmp_path / "other" / "EchoX-tiny", "--input", question,
                            "--output", tmp_path / "a.wav"), "wrong --vocoder folder")


def test_unreadable_audio(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    fails_with(capsys, chat(tiny_model_dir, "--input", bad, "--output", tmp_path / "a.wav"), "bad.wav")
    assert not (tmp_path / "a.wav").exists()


def test_cuda_without_a_gpu(tiny_model_dir, tmp_path, question, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails_with(capsys, chat(tiny_model_dir, "--device", "cuda", "--input", question, "--output",
                            tmp_path / "a.wav"), "no usable CUDA GPU")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "must be at least 1"),
])
def test_invalid_sampling_values(tiny_model_dir, tmp_path, question, capsys, flags, message):
    code = main(["chat", "--model", str(tiny_model_dir), "--input", str(question), "--output",
                 str(tmp_path / "a.wav"), *flags])
    fails_with(capsys, code, message)


def test_no_question(tiny_model_dir, tmp_path, capsys):
    fails_with(capsys, chat(tiny_model_dir, "--output", tmp_path / "a.wav"), "give --input")


def test_info_describes_the_folder(tiny_model_dir, capsys):
    assert main(["info", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 64" in out and "unit_model='large'" in out and "MISSING" not in out


def test_info_names_what_is_missing(tiny_root, tmp_path, capsys):
    shutil.copytree(tiny_root, tmp_path / "root")
    model = tmp_path / "root" / "EchoX-tiny"
    (model / "generation_config.json").unlink()
    (model / "tokenizer.json").unlink()
    assert main(["info", str(model)]) == 2
    captured = capsys.readouterr()
    assert "missing        generation_config.json, tokenizer.json" in captured.out
    assert "tokenizer.json: file not found" in captured.err and "Traceback" not in captured.err


def test_convert_round_trip(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "vocoder.safetensors"
    assert main(["convert", str(tiny_model_dir), str(out)]) == 0
    fails_with(capsys, main(["convert", str(tiny_model_dir), str(out)]), "already exists")


def test_demo_runs_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.wav"
    assert main(["demo", "--output", str(out), "--max-new-tokens", "24", "--max-units", "20"]) == 0
    text = capsys.readouterr().out
    assert "random" in text and "latency breakdown" in text and out.stat().st_size > 44
    fails_with(capsys, main(["demo", "--output", str(out)]), "already exists")
