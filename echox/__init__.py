"""echox: a compact, fast, from-scratch engine for the EchoX speech-to-speech LLM.

    engine = echox.load("EchoX-8B", whisper="whisper-large-v3", device="cuda")
    for event in engine.session().respond(audio="question.wav"): ...
"""

from importlib import import_module

from .errors import EchoXError

# Imported on first use (PEP 562), not with the package: the `echox` command imports this package
# before it parses its arguments, and torch takes seconds to import (`echox --help` waited for it,
# and a Ctrl-C in those seconds ended in a traceback).
_EXPORTED_FROM = {
    "load": "engine", "Engine": "engine", "Session": "engine", "TextDelta": "engine", "AudioChunk": "engine",
    "TurnDone": "engine", "SamplingParams": "sampling", "GREEDY": "sampling", "RELEASED_SAMPLING": "sampling",
    "SegmenterParams": "segmenter", "RELEASED_SEGMENTER": "segmenter", "LOW_LATENCY_SEGMENTER": "segmenter",
}


def __getattr__(name: str):
    if name not in _EXPORTED_FROM:
        raise AttributeError(f"module 'echox' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTED_FROM[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = ["EchoXError", *_EXPORTED_FROM]
