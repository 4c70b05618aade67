"""The segmentation rule of SPEC §6 on crafted score sequences."""

import pytest

from echox.errors import EchoXError
from echox.segmenter import LONGEST_SEGMENT, Segmenter, SegmenterParams, segment_all


def brute_force(scores, w=5, min_len=50, min_conf=20, conf=0.1):
    """SPEC §6 written as directly as possible: the oracle for the streaming class."""
    segments, start = [], 0
    for t in range(len(scores)):
        c = t - w
        if c < 0:
            continue
        peak = scores[c] == max(scores[max(0, c - w):c + w + 1])
        if peak and (c - start >= min_len or (scores[c] > conf and c - start >= min_conf)):
            segments.append((start, c + 1))
            start = c + 1
    if start < len(scores):
        segments.append((start, len(scores)))
    return segments


def test_confident_peak_cuts_after_twenty_tokens():
    scores = [0.0] * 40
    scores[25] = 0.5
    assert segment_all(scores) == [(0, 26), (26, 40)]


def test_weak_peak_needs_fifty_tokens():
    # A rising ramp has no peaks of its own (a flat stretch would: ties count as peaks).
    scores = [-0.1 + 1e-4 * i for i in range(80)]
    scores[25] = 0.05  # a peak but not confident, and only 25 tokens in
    scores[60] = 0.05
    assert segment_all(scores) == [(0, 61), (61, 80)]


def test_peak_must_lead_its_lookahead_window():
    scores = [0.0] * 40
    scores[25], scores[28] = 0.5, 0.6  # 25 is not the max of s[20:31]
    assert segment_all(scores) == [(0, 29), (29, 40)]


def test_cut_is_known_only_after_the_lookahead():
    seg = Segmenter()
    scores = [0.0] * 25 + [0.5] + [0.0] * 5
    results = [seg.push(s) for s in scores]
    assert results[:30] == [None] * 30 and results[30] == (0, 26)


def test_matches_brute_force_on_random_scores():
    import random
    rng = random.Random(0)
    for _ in range(50):
        scores = [round(rng.uniform(-0.2, 0.3), 2) for _ in range(rng.randint(0, 300))]
        assert segment_all(scores) == brute_force(scores)


def test_low_latency_first_segment():
    scores = [-0.1] * 40
    scores[9] = 0.01
    params = SegmenterParams(first_min_len=8)
    assert segment_all(scores, params)[0] == (0, 10)
    assert segment_all(scores)[0] == (0, 40)


def test_empty_answer_has_no_segment():
    assert segment_all([]) == []


def test_bad_parameters():
    with pytest.raises(EchoXError):
        SegmenterParams(lookahead=-1)


def test_a_segment_without_a_cut_ends_at_the_longest_the_echo_decoder_takes():
    """Thresholds that never cut (or an answer past the released 512 tokens) failed the whole turn
    after all its text, when the echo decoder's cache could not take the segment."""
    never = SegmenterParams(min_len=10 ** 6, min_len_confident=10 ** 6)
    scores = [float(i % 7) for i in range(2 * LONGEST_SEGMENT + 100)]
    assert segment_all(scores, never) == [(0, LONGEST_SEGMENT), (LONGEST_SEGMENT, 2 * LONGEST_SEGMENT),
                                          (2 * LONGEST_SEGMENT, 2 * LONGEST_SEGMENT + 100)]
