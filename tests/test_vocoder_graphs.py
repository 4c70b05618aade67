"""Steady-state generator pushes with device counts (vocoder_graphs.py): the computation a CUDA
graph captures gives exactly the eager pushes' samples and states, alone and batched; on a GPU
the captured graphs give the eager result."""

import functools
import itertools

import pytest
import torch
from test_streaming_vocoder import random_units
from test_vocoder import random_vocoder

from echox.streaming_vocoder import (
    Push,
    StreamingVocoder,
    advance_streams,
    initial_state,
    state_shape,
)
from echox.vocoder_graphs import SteadyPush, pack, steady_state

# (first push, later pushes, units): the engine's pattern, pushes of one unit, pushes past one piece
PATTERNS = [(24, 32, 200), (24, 1, 60), (9, 300, 400)]


@pytest.fixture(scope="module")
def vocoder():
    return random_vocoder()


def speak(stream: StreamingVocoder, units: torch.Tensor, first: int, later: int) -> list[torch.Tensor]:
    """The chunks of one segment pushed as the engine pushes it, then flushed."""
    cuts = [0, *range(first, len(units), later), len(units)]
    chunks = [stream.push(units[a:b]) for a, b in itertools.pairwise(cuts)]
    return chunks + [stream.flush()]


@pytest.mark.parametrize("first,later,count", PATTERNS)
def test_steady_pushes_equal_eager_ones_exactly(vocoder, first, later, count):
    steady = SteadyPush(vocoder, capture=False)
    units = random_units(count, seed=first + later)
    eager = speak(StreamingVocoder(vocoder), units, first, later)
    stream = StreamingVocoder(vocoder, advance=functools.partial(advance_streams, steady=steady))
    chunks = speak(stream, units, first, later)
    assert steady.replays > 0  # the steady path really ran
    assert [c.shape for c in chunks] == [c.shape for c in eager]
    assert all(torch.equal(c, e) for c, e in zip(chunks, eager))
    assert (torch.cat(chunks) - vocoder(units)).abs().max() <= 1e-5


def test_only_steady_streams_away_from_their_end_take_the_steady_path(vocoder):
    steady = SteadyPush(vocoder, capture=False)
    fresh = initial_state(vocoder).generator
    assert not steady.takes(fresh, (False,))
    assert steady.takes(steady.template, (False,)) and not steady.takes(steady.template, (True,))
    assert state_shape(steady_state(vocoder)) == state_shape(steady.template)


def together(vocoder, units: list[torch.Tensor], steady: SteadyPush | None) -> list[torch.Tensor]:
    """Streams pushed side by side in one advance_streams call per push: 24 units, then 12."""
    states = [initial_state(vocoder) for _ in units]
    waves = [[] for _ in units]
    for start, stop in [(0, 24), (24, 36), (36, 48), (48, 60)]:
        pushes = [Push(state, u[start:stop], stop == 60, None) for state, u in zip(states, units)]
        advance_streams(vocoder, pushes, steady)
        states = [push.state for push in pushes]
        for wave, push in zip(waves, pushes):
            wave += push.samples
    return [torch.cat(wave) for wave in waves]


def test_streams_pushed_together_equal_eager_batched_pushes(vocoder):
    """Three steady streams in one steady push (one flat state [3, N]) get exactly what the eager
    batched push gives them, and each its offline waveform."""
    steady = SteadyPush(vocoder, capture=False)
    units = [random_units(60, seed=s) for s in (1, 2, 3)]
    waves = together(vocoder, units, steady)
    assert steady.replays == 2  # the two middle pushes, all three streams in each
    assert all(torch.equal(got, want) for got, want in zip(waves, together(vocoder, units, None)))
    assert all((wave - vocoder(u)).abs().max() <= 1e-5 for wave, u in zip(waves, units))


def test_streams_padded_to_a_graph_width_get_what_they_get_unpadded(vocoder):
    """A batched engine's graphs run 1, 2, 4, ... streams: three run as four, the last repeated,
    and each gets the samples the eager push of the three gives it."""
    steady = SteadyPush(vocoder, capture=False)
    steady.use_widths(6)
    assert steady.widths == [1, 2, 4, 6]
    padded, step = [], steady.step

    def recording_step(features, valid, flat):
        padded.append(valid.tolist())
        return step(features, valid, flat)
    steady.step = recording_step
    units = [random_units(60, seed=s) for s in (1, 2, 3)]
    waves = together(vocoder, units, steady)
    assert len(padded) == 2 and all(len(valid) == 4 and valid[3] == valid[2] for valid in padded)
    assert all(torch.equal(got, want) for got, want in zip(waves, together(vocoder, units, None)))


def test_the_flat_state_holds_every_cache(vocoder):
    steady = SteadyPush(vocoder, capture=False)
    flat = pack(steady.template)
    assert flat.shape == (1, sum(steady.sizes))
    assert state_shape(steady.unpack(flat)) == state_shape(steady.template)
    assert torch.equal(pack(steady.unpack(flat)), flat)


def test_the_captured_push_reads_no_value_on_the_host(vocoder):
    """What a CUDA graph captures may not sync with the host. Fake tensors carry shapes but no
    values: any read of a value (.item(), int(), a data-dependent shape) raises, so the steady
    push running on them is free of syncs."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        FakeTensorMode,
    )
    steady = SteadyPush(vocoder, capture=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    flat = pack(steady.template)
    features, valid, flat = (mode.from_tensor(t) for t in (
        torch.zeros(2, vocoder.conv_pre.in_channels, 12), torch.tensor([12, 7]), torch.cat([flat, flat])))
    with mode:
        samples, state = steady.step(features, valid, flat)
        with pytest.raises(DataDependentOutputException):  # what a sync would do
            valid.max().item()
    assert samples.shape == (2, 12 * vocoder.cfg.hop_length) and state.shape == flat.shape


def test_a_failed_capture_leaves_pushes_eager_and_says_so(vocoder, monkeypatch):
    from echox import vocoder_graphs

    def capture_fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(vocoder_graphs, "GraphedStep", capture_fails)
    monkeypatch.setattr(vocoder_graphs.torch.cuda, "graph_pool_handle", lambda: object())
    steady = SteadyPush(vocoder, capture=True)
    units = random_units(80, seed=5)
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        chunks = speak(StreamingVocoder(vocoder, advance=functools.partial(advance_streams, steady=steady)),
                       units, 24, 32)
    assert not steady.capture and steady.replays > 0
    assert all(torch.equal(c, e) for c, e in zip(chunks, speak(StreamingVocoder(vocoder), units, 24, 32)))


@pytest.mark.gpu
@pytest.mark.parametrize("first,later,count", PATTERNS)
def test_graphed_pushes_equal_eager_ones(exact_fp32_convs, first, later, count):
    vocoder = random_vocoder().cuda()
    graphs = SteadyPush(vocoder, capture=True)
    graphs.capture_buckets(32)
    units = random_units(count, seed=first + later).cuda()
    eager = speak(StreamingVocoder(vocoder), units, first, later)
    chunks = speak(StreamingVocoder(vocoder, advance=functools.partial(advance_streams, steady=graphs)),
                   units, first, later)
    assert graphs.replays > 0 and len(graphs.graphs) >= 1
    torch.testing.assert_close(torch.cat(chunks), torch.cat(eager), atol=1e-6, rtol=0)
    assert (torch.cat(chunks) - vocoder(units)).abs().max() <= 1e-5


@pytest.mark.gpu
def test_graphed_pushes_of_several_streams_equal_eager_ones():
    vocoder = random_vocoder().cuda()
    graphs = SteadyPush(vocoder, capture=True)
    graphs.capture_buckets(16)
    graphs.use_widths(4)
    units = [random_units(60, seed=s).cuda() for s in (1, 2, 3)]
    waves = together(vocoder, units, graphs)
    assert graphs.replays == 2 and {width for width, _ in graphs.graphs} == {1, 2, 4}  # three ran as four
    for got, want in zip(waves, together(vocoder, units, None)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
