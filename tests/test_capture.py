"""Captured steps on a CPU (capture.py): TorchScript traces replay exactly what the eager steps
compute, for inputs other than the ones they were traced with, and a whole engine with them
answers as an eager one does, bit for bit."""

import gc

import pytest
import torch
from test_batch import CONVERSATIONS, converse

import echox.engine as echox_engine
from echox.capture import CapturedWidths, RecentCaptures, TracedStep, capture_widths
from echox.generate import TextDecoder
from echox.sampling import SamplingParams


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return echox_engine.load(tiny_model_dir, graphs=False)


@pytest.fixture(scope="module")
def traced(tiny_model_dir):
    return echox_engine.load(tiny_model_dir)


def test_a_cpu_engine_captures_by_default(traced, eager):
    assert traced.graphs and isinstance(traced.echo.block_function(full_head=False), TracedStep)
    assert not eager.graphs and traced.steady_push is None  # vocoder pushes stay eager on a CPU


@pytest.mark.parametrize("conversation", CONVERSATIONS[:3], ids=["greedy", "greedy-short", "sampled"])
def test_a_traced_engine_answers_as_an_eager_one(traced, eager, conversation):
    got, want = converse(traced, *conversation), converse(eager, *conversation)
    assert [trace for trace, _ in got] == [trace for trace, _ in want]
    assert all(torch.equal(audio, expected) for (_, audio), (_, expected) in zip(got, want))


def test_a_traced_batched_step_follows_positions_and_tokens(tiny_model_dir):
    """The batched LLM step traced at one position replays at others: the attention's used cache
    length is live in the trace, not the length it was traced with."""
    engine = echox_engine.load(tiny_model_dir, graphs=False, max_batch=3)
    batcher = engine.text_batcher
    captured = CapturedWidths(batcher.decode, 3, batcher.idle_inputs, torch.device("cpu"))
    for width, positions in ((3, [5, 9, 17]), (2, [40, 3]), (3, [6, 10, 18])):
        feed = torch.tensor([7, 11, 13][:width])
        at = torch.tensor(positions)[:, None]
        # Both write the same keys and values at `at`, so their order does not matter.
        assert torch.equal(captured(feed, at), batcher.decode(feed, at))
    assert sorted(captured.steps) == [2, 3] and isinstance(captured.steps[3], TracedStep)


def test_a_traced_sampled_step_draws_with_the_counter_of_each_call(traced):
    """The sampling counter is read live by the trace (and bumped by the caller), so a replay
    draws what the eager step draws at the same count."""
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    tok = traced.tokenizer
    decoders = [TextDecoder(traced.lm, tok.pad, tok.eot, tok.period, 64, use_graphs=g) for g in (False, True)]
    draws = []
    for decoder in decoders:
        step, token, got = decoder.step_function(sampled), torch.tensor([5]), []
        decoder.prefill([1, 2, 3, 4], {})
        for position in range(4, 12):
            hidden, token, score = step(token, torch.tensor([position]))
            decoder.step += 1
            got.append((token.item(), score.item(), hidden))
        draws.append(got)
    assert isinstance(decoders[1].traced_body, TracedStep) and not decoders[1].graphs
    for (token, score, hidden), (want_token, want_score, want_hidden) in zip(*draws):
        assert (token, score) == (want_token, want_score) and torch.equal(hidden, want_hidden)


def test_a_cpu_batch_runs_at_every_width():
    assert capture_widths(6, torch.device("cpu")) == [1, 2, 3, 4, 5, 6]
    assert capture_widths(6, torch.device("cuda")) == [1, 2, 4, 6]


def test_a_new_session_takes_a_collected_one_s_cache_and_its_trace(traced, eager):
    """torch.jit never frees a trace, so sessions pass their KV caches (each with its one trace,
    which serves every sampling setting) on instead of tracing anew; a cache passed on is emptied
    and its sampling counter restarts, so the next session answers as on a fresh engine."""
    sampled = CONVERSATIONS[2]
    session = traced.session(sampling=SamplingParams(temperature=0.3, seed=9))
    decoder = session.decoder
    del session
    gc.collect()
    spares = {id(d): d.traced_body for d in traced.spare_decoders}
    assert id(decoder) in spares and spares[id(decoder)] is not None
    got = converse(traced, *sampled)
    gc.collect()
    assert {id(d): d.traced_body for d in traced.spare_decoders} == spares  # none new, none traced anew
    want = converse(eager, *sampled)
    assert [trace for trace, _ in got] == [trace for trace, _ in want]
    assert all(torch.equal(audio, expected) for (_, audio), (_, expected) in zip(got, want))


def test_recent_captures_keep_the_last_few_and_drop_the_least_recently_used():
    """On a GPU an unbatched decoder captures its step per sampling setting; the settings a server's
    clients send are countless, so only the last few captures (and their memory) are kept."""
    made = []
    captures = RecentCaptures(2)

    def make(key):
        made.append(key)
        return f"graph {key}"
    assert captures.get(0.2, lambda: make(0.2)) == "graph 0.2"
    captures.get(0.7, lambda: make(0.7))
    assert captures.get(0.2, lambda: make(0.2)) == "graph 0.2"  # kept: not made again, now the most recent
    captures.get(1.0, lambda: make(1.0))  # drops 0.7, the least recently used
    captures.get(0.7, lambda: make(0.7))
    assert made == [0.2, 0.7, 1.0, 0.7] and len(captures) == 2


def test_sessions_with_nearby_kv_limits_share_a_cache_and_keep_their_own_limit(traced):
    """KV caches come in multiples of KV_BLOCK positions: a session limited to 307 takes the cache
    (and the trace) of a collected one limited to 300, and is held to 307, not to the capacity.
    One cache per distinct limit used to pile up, each with a trace that is never freed."""
    from echox.errors import ConversationFull
    from echox.generate import KV_BLOCK
    session = traced.session(max_len=300)
    decoder = session.decoder
    del session
    gc.collect()
    again = traced.session(max_len=307, max_new_tokens=4)
    assert again.decoder is decoder and again.decoder.state.caches[0].k.shape[2] == KV_BLOCK
    with pytest.raises(ConversationFull, match="holds 307"):
        list(again.respond(text="word " * 400))
    del again
    gc.collect()
    assert any(spare is decoder for spare in traced.spare_decoders)
    assert traced.session(max_len=KV_BLOCK + 1).decoder is not decoder  # the next block: another cache
    assert any(spare is decoder for spare in traced.spare_decoders)
