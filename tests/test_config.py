"""Config parsing: the T2U size rule of SPEC §7 and the released presets."""

import pytest

from echox.config import ECHOX_3B_LLM, ECHOX_8B_LLM, echo_body_for


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
