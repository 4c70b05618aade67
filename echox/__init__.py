"""echox: a compact, fast, from-scratch engine for the EchoX speech-to-speech LLM.

    engine = echox.load("EchoX-8B", whisper="whisper-large-v3", device="cuda")
    for event in engine.session().respond(audio="question.wav"): ...
"""

from .engine import AudioChunk, Engine, Session, TextDelta, TurnDone, load
from .errors import EchoXError
from .sampling import GREEDY, RELEASED_SAMPLING, SamplingParams
from .segmenter import LOW_LATENCY_SEGMENTER, RELEASED_SEGMENTER, SegmenterParams

__all__ = ["load", "Engine", "Session", "TextDelta", "AudioChunk", "TurnDone", "EchoXError", "SamplingParams",
           "GREEDY", "RELEASED_SAMPLING", "SegmenterParams", "RELEASED_SEGMENTER", "LOW_LATENCY_SEGMENTER"]
