"""The unit language: n-gram merges, units <-> tokens both ways, and a tokenizer.json the engine reads."""

import shutil

import pytest
import torch

from echox.errors import EchoXError
from echox.tokenizer import Tokenizer
from echox.train.units import UnitLanguage, write_unit_tokens


def test_merges_follow_pair_frequency():
    language = UnitLanguage.build([[1, 2, 3, 1, 2, 3], [1, 2, 4]], size=6)
    # (1,2) occurs three times, then ((1,2),3) twice; nothing else occurs twice.
    assert language.tokens == ((1,), (2,), (3,), (4,), (1, 2), (1, 2, 3))
    assert language.encode([1, 2, 3, 1, 2, 4]) == [5, 4, 3]
    assert language.strings()[5] == "<|unit_1_2_3|>"


def test_round_trip_and_ngram_limit():
    gen = torch.Generator().manual_seed(1)
    words = [torch.randint(0, 12, (n,), generator=gen).tolist() for n in (2, 3, 4, 5, 5)]  # recurring unit runs
    sequences = [sum((words[i] for i in torch.randint(0, 5, (8,), generator=gen).tolist()), []) for _ in range(30)]
    language = UnitLanguage.build(sequences, size=40, max_ngram=3)
    assert language.longest == 3 and len(language.tokens) <= 40  # merges grow up to the n-gram limit, never past it
    for units in sequences:
        tokens = language.encode(units)
        assert language.decode(tokens) == units
        assert len(tokens) < len(units)  # the merges shorten what the decoder has to write


def test_units_without_a_token_are_named():
    language = UnitLanguage.build([[1, 2]], size=2)
    with pytest.raises(EchoXError, match="unit 7 has no token"):
        language.encode([1, 7])
    with pytest.raises(EchoXError, match="cannot hold the 3 unit values"):
        UnitLanguage.build([[1, 2, 3]], size=2)
    with pytest.raises(EchoXError, match="0..999"):
        UnitLanguage.build([[1000]], size=4)


def test_written_tokens_are_what_the_engine_unit_table_reads(tiny_model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    original = Tokenizer(tmp_path)
    text_vocab = original.audio_patch + 1
    language = UnitLanguage.build([[5, 6, 7, 5, 6, 7, 5, 6], [7, 8, 9]], size=9)
    write_unit_tokens(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json", language, text_vocab)
    rewritten = Tokenizer(tmp_path)
    assert rewritten.hf.get_vocab_size() == text_vocab + len(language.tokens)  # old unit tokens are gone
    table = rewritten.unit_table(text_vocab, len(language.tokens))
    assert [tuple(units) for units in table] == list(language.tokens)
    assert UnitLanguage.from_tokenizer(rewritten, text_vocab, len(language.tokens)) == language
    assert rewritten.encode("hello") == original.encode("hello")  # the text vocabulary is untouched
