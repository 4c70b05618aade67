"""The server's audio edge: streaming 16 -> 24 kHz resampling equals offline resampling, pcm16 codec."""

import base64

import pytest
import torch

from echox.audio import resample
from echox.serve.audio_edge import StreamingResampler, pcm16_base64, pcm16_from_base64, samples_from_pcm16
from echox.serve.protocol import ProtocolError


@pytest.mark.parametrize("chunks", [[4000], [1, 2, 3, 500, 7, 1200], [320] * 13, [50, 9000, 3]])
def test_streaming_resampler_equals_offline(chunks):
    gen = torch.Generator().manual_seed(len(chunks))
    signal = torch.randn(sum(chunks), generator=gen) * 0.3
    resampler = StreamingResampler(16000, 24000)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(resampler.push(signal[start:start + n]))
        start += n
    pieces.append(resampler.flush())
    streamed = torch.cat(pieces)
    offline = resample(signal, 16000, 24000)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, atol=1e-6, rtol=0)


def test_streaming_resampler_emits_with_a_short_delay():
    resampler = StreamingResampler(16000, 24000)
    out = resampler.push(torch.zeros(16000))  # one second in
    assert 24000 - out.numel() <= 3 * resampler.reach  # all but the filter's reach is out already
    assert resampler.tail.numel() <= 2 * resampler.reach + 2 * resampler.down  # the kept input stays short


def test_pcm16_round_trip_and_clipping():
    samples = torch.tensor([0.0, 0.5, -0.5, 1.5, -1.5, 1 / 32768])
    decoded = samples_from_pcm16(pcm16_from_base64(pcm16_base64(samples), "audio"))
    expected = torch.tensor([0.0, 16384 / 32768, -16384 / 32768, 32767 / 32768, -32767 / 32768, 1 / 32768])
    torch.testing.assert_close(decoded, expected, atol=0, rtol=0)


@pytest.mark.parametrize("payload, code", [("%%%", "invalid_base64"), (base64.b64encode(b"abc").decode(), "invalid_audio"),
                                           (12, "invalid_value")])
def test_bad_pcm16_payloads_are_named(payload, code):
    with pytest.raises(ProtocolError) as caught:
        pcm16_from_base64(payload, "audio")
    assert caught.value.code == code and caught.value.param == "audio"
