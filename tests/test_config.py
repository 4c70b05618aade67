"""Config parsing: the T2U size rule of SPEC §7 and the released presets."""

import json

import pytest

from echox.config import ECHOX_3B_LLM, ECHOX_8B_LLM, VocoderConfig, WhisperConfig, echo_body_for, read_json
from echox.errors import EchoXError


@pytest.mark.parametrize("unit_model, expected", [
    ("large", (4096, 2, 32, 8, 14336)),
    ("small", (512, 4, 8, 8, 2048)),
    (None, (512, 6, 8, 8, 2048)),
    ("base", (768, 8, 12, 12, 2048)),
])
def test_echo_body_sizes(unit_model, expected):
    body = echo_body_for(unit_model, ECHOX_8B_LLM, vocab_size=128257 + 8000)
    got = (body.hidden_size, body.num_layers, body.num_heads, body.num_kv_heads, body.intermediate_size)
    assert got == expected
    assert body.head_dim * body.num_heads == body.hidden_size
    assert body.max_position_embeddings == 2048
    assert body.rope_scaling == ECHOX_8B_LLM.rope_scaling and body.rope_theta == ECHOX_8B_LLM.rope_theta


def test_released_presets():
    assert ECHOX_8B_LLM.vocab_size == ECHOX_3B_LLM.vocab_size == 128257
    assert ECHOX_3B_LLM.tie_word_embeddings and not ECHOX_8B_LLM.tie_word_embeddings


@pytest.mark.parametrize("field,value,message", [
    ("upsample_rates", 5, "field 'upsample_rates' is 5, expected a list"),
    ("upsample_rates", [5, "4", 4, 2, 2], "an entry of 'upsample_rates' is \"4\""),
    ("resblock_dilation_sizes", [[1, 3, 5], [1, None, 5], [1, 3, 5]], "an entry of 'resblock_dilation_sizes' is null"),
    ("dur_predictor_params", [128], "field 'dur_predictor_params' is \\[128\\], expected an object"),
    ("multispkr", "no", "field 'multispkr' is \"no\", expected true or false"),
])
def test_vocoder_config_fields_of_the_wrong_type_are_named(tmp_path, field, value, message):
    raw = VocoderConfig().to_json() | {field: value}
    (tmp_path / "vocoder_config.json").write_text(json.dumps(raw))
    with pytest.raises(EchoXError, match=message):
        VocoderConfig.from_dir(tmp_path)


def test_whisper_config_size_of_the_wrong_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_mel_bins": 128, "d_model": "1280", "encoder_layers": 2,
                                                      "encoder_attention_heads": 4, "encoder_ffn_dim": 8}))
    with pytest.raises(EchoXError, match="field 'd_model' is \"1280\", expected a positive integer"):
        WhisperConfig.from_dir(tmp_path)


def test_whisper_heads_that_do_not_divide_its_width_are_named(tmp_path):
    """They passed, and the encoder's view failed mid-turn with a RuntimeError traceback."""
    (tmp_path / "config.json").write_text(json.dumps({"num_mel_bins": 128, "d_model": 64, "encoder_layers": 2,
                                                      "encoder_attention_heads": 3, "encoder_ffn_dim": 8}))
    with pytest.raises(EchoXError, match=r"config.json: d_model 64 is not a multiple of encoder_attention_heads 3 "
                                         r"\(the Whisper encoder splits"):
        WhisperConfig.from_dir(tmp_path)


@pytest.mark.parametrize("text,message", [
    ("[" * 100000 + "]" * 100000, r"not valid JSON \(nested too deeply\)"),
    ('{"hidden_size": ' + "9" * 5000 + "}", r"not valid JSON \(Exceeds the limit \(4300 digits\) for integer string "
                                              r"conversion: value has 5000 digits\)$"),
], ids=["nested_too_deeply", "huge_integer"])
def test_json_too_deep_or_with_a_huge_integer_is_one_error(tmp_path, text, message):
    """Python's parser raises RecursionError and a plain ValueError for these, not JSONDecodeError."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(EchoXError, match="config.json: " + message):
        read_json(tmp_path / "config.json")


def test_vocoder_for_another_sampling_rate_is_refused(tmp_path):
    """sampling_rate was never read: a 22050 Hz vocoder's output was written as 16 kHz."""
    (tmp_path / "vocoder_config.json").write_text(json.dumps(VocoderConfig().to_json() | {"sampling_rate": 22050}))
    with pytest.raises(EchoXError, match=r"vocoder_config.json: a vocoder's sampling rate of 22050 Hz is not supported \(only 16000\)"):
        VocoderConfig.from_dir(tmp_path)
    (tmp_path / "vocoder_config.json").write_text(json.dumps(VocoderConfig().to_json() | {"sampling_rate": 16000}))
    assert VocoderConfig.from_dir(tmp_path).sample_rate == 16000
    with pytest.raises(EchoXError, match="rate of 24000 Hz is not supported"):  # made in Python, too
        VocoderConfig(sample_rate=24000)
