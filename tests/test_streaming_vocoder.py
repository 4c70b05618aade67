"""Streaming the vocoder gives exactly the offline waveform, with the look-ahead it announces."""

import math

import pytest
import torch
import torch.nn.functional as F

from echox.config import VocoderConfig
from echox.streaming_vocoder import (LARGEST_PIECE, Push, StreamingVocoder, Steps, _durations, advance_streams,
                                     bucket, generator_right_context, initial_state, map_tree, split_rows,
                                     stream_conv1d, stream_conv_transpose1d, stream_generator)
from echox.vocoder import Vocoder
from test_vocoder import TINY, random_vocoder


@pytest.fixture(scope="module")
def vocoder():
    return random_vocoder()


def random_units(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (count,), generator=torch.Generator().manual_seed(seed))


def streamed(stream: StreamingVocoder, units: torch.Tensor, chunk: int) -> torch.Tensor:
    pieces = [stream.push(units[i:i + chunk]) for i in range(0, len(units), chunk)]
    return torch.cat(pieces + [stream.flush()])


def split_points(length: int, seed: int) -> list[int]:
    """Random chunk boundaries, empty chunks included."""
    cuts = torch.randint(0, length + 1, (6,), generator=torch.Generator().manual_seed(seed)).sort().values
    return [0, *cuts.tolist(), length]


def with_junk(x: torch.Tensor, extra: int, seed: int) -> Steps:
    """x [B, C, n] followed by `extra` steps of large random padding: no valid output may see them."""
    junk = 1e3 * torch.randn(*x.shape[:-1], extra, generator=torch.Generator().manual_seed(seed))
    return Steps(torch.cat([x, junk], dim=-1), (x.shape[-1],) * x.shape[0])


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (7, 3), (11, 5)])
def test_stream_conv1d_equals_same_padded_conv(kernel, dilation):
    torch.manual_seed(kernel)
    x, weight, bias = torch.randn(2, 4, 40), torch.randn(5, 4, kernel), torch.randn(5)
    cache = torch.zeros(2, 4, (kernel - 1) * dilation // 2)
    bounds = split_points(40, kernel)
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        y, cache = stream_conv1d(cache, with_junk(x[..., start:end], 5, start), weight, bias, dilation, (False,) * 2)
        pieces.append(valid_steps(y))
        cache = torch.cat(cache)
    y, _ = stream_conv1d(cache, with_junk(x[..., :0], 3, 0), weight, bias, dilation, final=(True,) * 2)
    expected = F.conv1d(x, weight, bias, dilation=dilation, padding=(kernel - 1) * dilation // 2)
    torch.testing.assert_close(torch.cat(pieces + [valid_steps(y)], dim=-1), expected, atol=1e-5, rtol=0)


def valid_steps(y: Steps) -> torch.Tensor:
    """The valid steps of rows that all have as many, [B, C, m]."""
    assert len(set(y.valid)) == 1
    return y.data[..., :y.valid[0]]


@pytest.mark.parametrize("kernel, stride", [(11, 5), (8, 4), (4, 2)])
def test_stream_conv_transpose1d_equals_offline(kernel, stride):
    torch.manual_seed(kernel)
    x, weight, bias = torch.randn(1, 6, 30), torch.randn(6, 3, kernel), torch.randn(3)
    left = (kernel - 1 - (kernel - stride) // 2) // stride
    cache = torch.zeros(1, 6, left)
    bounds = split_points(30, stride)
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        y, cache = stream_conv_transpose1d(cache, with_junk(x[..., start:end], 4, start), weight, bias, stride,
                                           (False,))
        assert y.valid[0] % stride == 0
        pieces.append(valid_steps(y))
        cache = torch.cat(cache)
    y, _ = stream_conv_transpose1d(cache, with_junk(x[..., :0], 2, 0), weight, bias, stride, final=(True,))
    expected = F.conv_transpose1d(x, weight, bias, stride=stride, padding=(kernel - stride) // 2)
    torch.testing.assert_close(torch.cat(pieces + [valid_steps(y)], dim=-1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
@pytest.mark.parametrize("length", [1, 5, 40])  # 1 and 5 are shorter than the look-ahead
def test_streaming_equals_offline(vocoder, chunk, length):
    units = random_units(length, seed=length)
    stream = StreamingVocoder(vocoder)
    assert length < stream.lookahead_units or length == 40
    offline = vocoder(units)
    wave = streamed(stream, units, chunk)
    assert wave.shape == offline.shape
    assert (wave - offline).abs().max() <= 1e-5


def test_reset_and_flush_start_a_fresh_segment(vocoder):
    stream = StreamingVocoder(vocoder)
    stream.push(random_units(9, seed=1))
    stream.reset()
    first, second = random_units(13, seed=2), random_units(30, seed=3)
    assert (streamed(stream, first, 3) - vocoder(first)).abs().max() <= 1e-5
    assert (streamed(stream, second, 7) - vocoder(second)).abs().max() <= 1e-5
    assert stream.flush().numel() == 0
    assert stream.push(torch.zeros(0, dtype=torch.int64)).numel() == 0


def test_a_segment_without_units_is_silent_and_costs_no_call(vocoder):
    calls = []

    def advance(vocoder, pushes):
        calls.append(len(pushes))
        advance_streams(vocoder, pushes)
    stream = StreamingVocoder(vocoder, advance=advance)
    assert stream.flush().numel() == 0 and stream.flush(torch.zeros(0, dtype=torch.int64)).numel() == 0
    assert calls == []
    units = random_units(11, seed=4)
    assert (torch.cat([stream.push(units[:6]), stream.flush(units[6:])]) - vocoder(units)).abs().max() <= 1e-5
    assert calls == [1, 1]


def test_interleaved_streams_keep_their_own_state(vocoder):
    a, b = StreamingVocoder(vocoder), StreamingVocoder(vocoder)
    units_a, units_b = random_units(25, seed=4), random_units(25, seed=5)
    out_a, out_b = [], []
    for i in range(0, 25, 4):
        out_a.append(a.push(units_a[i:i + 4]))
        out_b.append(b.push(units_b[i:i + 4]))
    assert (torch.cat(out_a + [a.flush()]) - vocoder(units_a)).abs().max() <= 1e-5
    assert (torch.cat(out_b + [b.flush()]) - vocoder(units_b)).abs().max() <= 1e-5


def test_samples_come_out_within_the_announced_lookahead(vocoder):
    stream = StreamingVocoder(vocoder)
    units = random_units(60, seed=6)
    frames = vocoder.durations(units).cumsum(0)
    emitted = 0
    for pushed in range(1, 61):
        emitted += stream.push(units[pushed - 1:pushed]).numel()
        done = pushed - stream.lookahead_units  # units whose samples must all be out
        if done > 0:
            assert emitted >= int(frames[done - 1]) * TINY.hop_length


def test_generator_right_context_is_exact(vocoder):
    """Frame by frame: after n frames the generator has released all of frame n - 1 - R, not frame n - R."""
    context, hop = generator_right_context(vocoder), TINY.hop_length
    state = initial_state(vocoder).generator
    features = vocoder.frame_features(random_units(40, seed=7), None)
    emitted = 0
    for n in range(1, 41):
        samples, state = stream_generator(vocoder, state, Steps(features[..., n - 1:n], (1,)), (False,))
        state = split_rows(state, 1)[0]
        emitted += samples.row(0).numel()
        assert max(0, n - context) * hop <= emitted < max(1, n - context + 1) * hop


def test_real_size_lookahead_matches_the_spec():
    """SPEC §8: about 21 unit frames of generator context; plus 2 units for the duration convs."""
    with torch.device("meta"):
        real = Vocoder(VocoderConfig())
    assert generator_right_context(real) == 21
    assert StreamingVocoder(real).lookahead_units == 23


def test_multi_speaker_streaming_equals_offline():
    cfg = VocoderConfig(upsample_initial_channel=32, embedding_dim=16, duration_hidden=16,
                        num_speakers=3, speaker_embedding_dim=8)
    vocoder = random_vocoder(cfg, seed=1)
    units = random_units(20, seed=8)
    wave = streamed(StreamingVocoder(vocoder, speaker=2), units, 3)
    assert (wave - vocoder(units, speaker=2)).abs().max() <= 1e-5


def test_real_size_streaming_equals_offline():
    vocoder = random_vocoder(VocoderConfig(), seed=2)
    units = random_units(6, seed=9)
    assert (streamed(StreamingVocoder(vocoder), units, 4) - vocoder(units)).abs().max() <= 1e-5


@pytest.mark.parametrize("length, chunk", [(300, 300), (700, 90)])  # pieces longer than the largest bucket
def test_long_pushes_go_in_pieces_and_stay_exact(vocoder, length, chunk):
    units = random_units(length, seed=length)
    assert (streamed(StreamingVocoder(vocoder), units, chunk) - vocoder(units)).abs().max() <= 1e-5


def conv_shapes_per_push(monkeypatch, vocoder, segments: list[torch.Tensor], first: int, then: int):
    """For each push (the engine's pattern: `first` units, then `then` at a time, then a flush) of
    each segment: the input shapes of every conv the push ran, and the frames it made."""
    import echox.streaming_vocoder as sv
    calls = []
    for name in ("conv1d_valid", "conv_transpose1d_window"):
        op = getattr(sv, name)
        monkeypatch.setattr(sv, name, lambda x, *args, op=op, name=name: calls.append((name, tuple(x.shape)))
                            or op(x, *args))
    pushes = []
    for units in segments:
        stream = StreamingVocoder(vocoder)
        bounds = [0, *range(first, len(units), then), len(units)]
        for start, end in zip(bounds, bounds[1:]):
            calls.clear()
            stream.push(units[start:end])
            pushes.append(("push", start == 0, end - start, list(calls)))
        calls.clear()
        stream.flush()
        pushes.append(("flush", False, 0, list(calls)))
    return pushes


def test_pushes_of_a_bucket_run_the_same_conv_shapes(monkeypatch, vocoder):
    """Static shapes: whatever the units (and so the frame counts), pushes padded to the same
    buckets run every conv at the same shapes, so shape-keyed plans (oneDNN, CUDA graphs) are reused."""
    segments = [random_units(90, seed=s) for s in range(8)]
    by_input: dict[tuple, set] = {}
    pushes = conv_shapes_per_push(monkeypatch, vocoder, segments, 24, 32)
    for kind, first, count, shapes in pushes:
        # The two duration convs and conv_pre show the push's unit and frame buckets.
        by_input.setdefault((kind, first, tuple(shapes[:3])), set()).add(tuple(shapes[3:]))
    assert len(by_input) <= len(pushes) / 2  # pushes of different segments share buckets
    assert all(len(variants) == 1 for variants in by_input.values())


@pytest.mark.parametrize("length, chunk", [(3, 5), (40, 7), (40, 40)])
def test_flush_takes_the_last_units(vocoder, length, chunk):
    """flush(units) = push(units) then flush(), in one generator call."""
    units = random_units(length, seed=length + chunk)
    stream = StreamingVocoder(vocoder)
    bounds = list(range(0, length, chunk))
    pieces = [stream.push(units[a:b]) for a, b in zip(bounds, bounds[1:])]
    wave = torch.cat(pieces + [stream.flush(units[bounds[-1]:])])
    assert (wave - vocoder(units)).abs().max() <= 1e-5
    assert stream.flush().numel() == 0  # the stream was reset


def test_buckets_are_few_and_pad_by_at_most_a_quarter():
    sizes = [bucket(n) for n in range(1, LARGEST_PIECE + 1)]
    assert all(n <= size <= 1.25 * n for n, size in enumerate(sizes, start=1))
    assert sizes == sorted(sizes) and len(set(sizes)) <= 30


def test_streams_advanced_together_equal_each_offline(monkeypatch, vocoder):
    """advance_streams: streams at different points (some starting, some ending, one longer than a
    piece) advance in one call; each still gets exactly its offline waveform, and streams in the
    same state shape really shared their convs."""
    import echox.streaming_vocoder as streaming
    widest = []
    conv = streaming.conv1d_valid
    monkeypatch.setattr(streaming, "conv1d_valid", lambda x, *a: widest.append(x.shape[0]) or conv(x, *a))
    units = [random_units(n, seed=n) for n in (40, 33, 3, 300)]
    chunks = [(24, 8), (24, 5), (2, 2), (24, 290)]  # first push, later pushes
    states = [initial_state(vocoder) for _ in units]
    waves, done = [[] for _ in units], [0] * len(units)
    while any(d < len(u) for d, u in zip(done, units)):
        pushes, rows = [], []
        for b, (u, (first, later)) in enumerate(zip(units, chunks)):
            if done[b] < len(u):
                stop = min(len(u), done[b] + (first if done[b] == 0 else later))
                pushes.append(streaming.Push(states[b], u[done[b]:stop], stop == len(u), None))
                rows.append(b)
                done[b] = stop
        streaming.advance_streams(vocoder, pushes)
        for b, push in zip(rows, pushes):
            states[b] = push.state
            waves[b] += push.samples
    for u, wave in zip(units, waves):
        assert (torch.cat(wave) - vocoder(u)).abs().max() <= 1e-5
    assert max(widest) >= 2


def test_a_stream_keeps_only_its_caches_not_the_buffers_of_its_last_push(vocoder):
    """Each tensor of a stream's state owns its memory: a view would keep every activation of the
    push alive (hundreds of MB per stream at the released shape)."""
    stream = StreamingVocoder(vocoder)
    stream.push(random_units(40, 0))
    stream.push(random_units(9, 1))
    leaves = []
    map_tree(lambda t: leaves.append(t), stream.state)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in leaves if t.numel())


def test_streamed_durations_equal_offline_at_a_rounding_edge(vocoder):
    """A unit's frames round exp(log d) - 1: put one unit right at an edge (2.5 frames) and move it
    across in steps of 1e-7; the streamed predictor (pushes of 7, a cache per conv) must round as
    the offline one does on every side (in fp32 they differed near the edge)."""
    units = random_units(40, 11)
    predictor = vocoder.dur_predictor
    bias = predictor.proj.bias.clone()
    at_edge = math.log(3.5) - float(predictor(vocoder.dict(units).T[None].to(predictor.proj.weight.dtype))[0, 20])
    try:
        for step in range(-300, 300):
            predictor.proj.bias.copy_(bias + at_edge + step * 1e-7)
            offline = vocoder.durations(units)
            state, frames = initial_state(vocoder), 0
            for start in range(0, 40, 7):  # the duration predictor's part of each push
                push = Push(state, units[start:start + 7], start + 7 >= 40, None)
                _durations(vocoder, [(push, (0, len(push.units)), push.final)])
                state, frames = push.state, frames + push.frames.shape[-1]
            assert frames == int(offline.sum()), f"bias step {step}"
    finally:
        predictor.proj.bias.copy_(bias)
