"""Cutting the LLM's hidden-state stream into segments for the echo decoder (SPEC §6).

Each generated token t has a score s_t = cos(h_t, lm_head row of "."): how much its hidden
state already "looks like" the end of a sentence. With a look-ahead of w tokens, after token t
the candidate c = t - w ends a segment when s_c is the maximum of s[c-w : c+w+1] (a peak)
and the segment is long enough: at least `min_len` tokens, or at least `min_len_confident`
when s_c > `confident_score`. Whatever remains after the last token is the final segment.

A segment that reaches LONGEST_SEGMENT tokens without a cut ends there: the echo decoder's cache is
sized for no longer one. A released answer (at most 512 tokens) never gets there; an answer allowed
more tokens, or thresholds that never cut, would otherwise fail its turn after all its text.
"""

from dataclasses import dataclass

from .errors import EchoXError


@dataclass(frozen=True)
class SegmenterParams:
    lookahead: int = 5
    min_len: int = 50
    min_len_confident: int = 20
    confident_score: float = 0.1
    # Opt-in low-latency policy: the first segment needs only this many tokens (None = released).
    first_min_len: int | None = None

    def __post_init__(self):
        if self.lookahead < 0 or self.min_len < 1 or self.min_len_confident < 1:
            raise EchoXError("segmenter look-ahead must be >= 0 and minimum lengths >= 1")
        if self.first_min_len is not None and self.first_min_len < 1:
            raise EchoXError("segmenter first_min_len must be >= 1")


RELEASED_SEGMENTER = SegmenterParams()
LONGEST_SEGMENT = 512  # LLM tokens: the released answer limit, so no released segment is longer
LOW_LATENCY_SEGMENTER = SegmenterParams(first_min_len=8)


class Segmenter:
    """Streaming form of the rule: feed scores one by one, get segment ends as they are known."""

    def __init__(self, params: SegmenterParams = RELEASED_SEGMENTER):
        self.params = params
        self.scores: list[float] = []
        self.start = 0
        self.segments_cut = 0

    def _long_enough(self, candidate: int) -> bool:
        p, length = self.params, candidate - self.start
        if self.segments_cut == 0 and p.first_min_len is not None:
            return length >= p.first_min_len
        return length >= p.min_len or (self.scores[candidate] > p.confident_score and length >= p.min_len_confident)

    def push(self, score: float) -> tuple[int, int] | None:
        """Add the next token's score; return (start, end) of a segment that ends now, if any."""
        self.scores.append(score)
        w = self.params.lookahead
        c = len(self.scores) - 1 - w
        if c >= 0 and self.scores[c] == max(self.scores[max(0, c - w):c + w + 1]) and self._long_enough(c):
            return self._cut(c + 1)
        if len(self.scores) - self.start >= LONGEST_SEGMENT:
            return self._cut(len(self.scores))
        return None

    def _cut(self, end: int) -> tuple[int, int]:
        segment = (self.start, end)
        self.start = end
        self.segments_cut += 1
        return segment

    def finish(self) -> tuple[int, int] | None:
        """The final segment, (start, number of tokens), if any token is left."""
        if self.start >= len(self.scores):
            return None
        segment = (self.start, len(self.scores))
        self.start = len(self.scores)
        return segment


def segment_all(scores: list[float], params: SegmenterParams = RELEASED_SEGMENTER) -> list[tuple[int, int]]:
    """Every segment of a finished score sequence (the offline form, used to check traces)."""
    segmenter = Segmenter(params)
    cuts = [seg for s in scores if (seg := segmenter.push(s)) is not None]
    final = segmenter.finish()
    return cuts + ([final] if final else [])
