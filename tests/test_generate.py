"""LLM decoding: cached turns equal recomputation, scores are what SPEC §6 defines."""

import pytest
import torch
import torch.nn.functional as F

from echox.checkpoint import open_model_folder
from echox.errors import EchoXError
from echox.generate import AudioSlot, TextDecoder
from echox.llama import LlamaLM, lm_layout
from echox.sampling import GREEDY, SamplingParams
from echox.tokenizer import Turn


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    folder = open_model_folder(tiny_model_dir)
    lm = LlamaLM(folder.config.llm)
    lm.load_released(folder.weights.take(lm_layout(folder.config.llm), "LLM"))
    return lm.eval(), folder.tokenizer


def new_decoder(parts, max_len=1024):
    lm, tok = parts
    return TextDecoder(lm, tok.pad, tok.eot, tok.period, max_len)


def run_turn(decoder, slots, speech=None, sampling=GREEDY, n=30):
    hidden = decoder.prefill(slots, speech or {})
    return list(decoder.decode(hidden, len(slots), sampling, n))


@torch.no_grad()
def test_hidden_states_and_scores_match_a_full_forward(parts):
    lm, tok = parts
    slots = tok.prompt([Turn("user", "Name three colours.")])
    tokens = run_turn(new_decoder(parts), slots)
    assert tokens, "the tiny model must produce some tokens for this test to mean anything"
    ids = torch.tensor([slots + [t.id for t in tokens]])
    lm.body.setup_cache(1, ids.shape[1])
    full = lm(lm.embed_tokens(ids), torch.arange(ids.shape[1])[None], ids != tok.pad)[0]
    producing = full[len(slots) - 1:len(slots) - 1 + len(tokens)]  # h_t is the state that chose token t
    torch.testing.assert_close(torch.stack([t.hidden for t in tokens]), producing, atol=1e-5, rtol=0)
    assert [t.id for t in tokens] == lm.lm_head(producing).argmax(-1).tolist()
    scores = F.cosine_similarity(producing, lm.lm_head.weight[tok.period][None], dim=-1)
    torch.testing.assert_close(torch.tensor([t.score for t in tokens]), scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_second_turn_reusing_the_cache_equals_a_fresh_conversation(parts):
    lm, tok = parts
    speech = {0: torch.randn(7, lm.cfg.hidden_size)}
    first = tok.prompt([Turn("user", "hi", audio=True)])
    first = first[:first.index(tok.audio_patch)] + [AudioSlot(0, r) for r in range(7)] + \
        first[first.index(tok.audio_patch) + 1:]
    decoder = new_decoder(parts)
    answer = tok.decode([t.id for t in run_turn(decoder, first, speech)])
    history = [Turn("user", "hi", audio=True), Turn("assistant", answer), Turn("user", "and then?")]
    second = tok.prompt(history)
    at = second.index(tok.audio_patch)
    second = second[:at] + [AudioSlot(0, r) for r in range(7)] + second[at + 1:]
    reused = run_turn(decoder, second, speech)
    fresh = run_turn(new_decoder(parts), second, speech)
    assert [t.id for t in reused] == [t.id for t in fresh]
    torch.testing.assert_close(torch.stack([t.hidden for t in reused]), torch.stack([t.hidden for t in fresh]),
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_seed_dependent(parts):
    slots = parts[1].prompt([Turn("user", "Tell me a story.")])
    runs = [[t.id for t in run_turn(new_decoder(parts), slots, sampling=SamplingParams(1.0, 0.9, seed=s))]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@torch.no_grad()
def test_cache_overflow_is_a_clear_error(parts):
    slots = parts[1].prompt([Turn("user", "x" * 40)])
    with pytest.raises(EchoXError, match="KV cache"):
        run_turn(new_decoder(parts, max_len=len(slots) - 1), slots)
    with pytest.raises(EchoXError, match="reached the KV cache size"):
        run_turn(new_decoder(parts, max_len=len(slots) + 2), slots, n=10)


@torch.no_grad()
def test_prompt_that_cannot_fit_is_refused_before_the_prefill_runs(parts):
    slots = parts[1].prompt([Turn("user", "x" * 40)])
    decoder = new_decoder(parts, max_len=len(slots) - 1)
    decoder.require_room(len(slots) - 1)  # exactly full is allowed: the first token needs no new position
    with pytest.raises(EchoXError, match=f"needs {len(slots)} positions but its KV cache holds {len(slots) - 1}"):
        decoder.prefill(slots, {})
    assert decoder.cached == []  # nothing was computed into the cache
