"""A session's settings, checked whenever they are set.

`Session` takes them as keywords and lets its owner change them between turns (a server sets
the sampling and the answer's length for each response). A wrong value must fail where it is
given, in one clear error, not as a TypeError inside the next turn, nor by quietly answering
nothing (`max_new_tokens = 0` added an empty answer to the conversation).
"""

import numbers
from typing import Callable

from .errors import EchoXError
from .sampling import SamplingParams
from .segmenter import SegmenterParams


def require_count(**counts):
    """Each keyword a whole number >= 1 (not a bool, not a float: 2.5 units would never be reached)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # numpy ints too
            raise EchoXError(f"{name} must be a whole number >= 1, got {value!r}")


def require_type(kind: type, what: str) -> Callable[[str, object], None]:
    """A check that a setting is a `kind` (bool must be a real bool: "no" would count as true)."""
    def check(name: str, value):
        if not isinstance(value, kind):
            raise EchoXError(f"{name} must be {what}, got {value!r}")
    return check


def count(name: str, value):
    require_count(**{name: value})


class Checked:
    """A setting stored on the instance once `check(name, value)` accepts it."""

    def __init__(self, check: Callable[[str, object], None]):
        self.check = check

    def __set_name__(self, owner, name: str):
        self.name, self.stored = name, f"_{name}"

    def __get__(self, instance, owner=None):
        return self if instance is None else getattr(instance, self.stored)

    def __set__(self, instance, value):
        self.check(self.name, value)
        setattr(instance, self.stored, value)


class SessionSettings:
    """What a `Session` may change between turns."""

    sampling = Checked(require_type(SamplingParams, "a SamplingParams (echox.sampling)"))
    segmenter = Checked(require_type(SegmenterParams, "a SegmenterParams (echox.segmenter)"))
    max_new_tokens = Checked(count)
    max_units = Checked(count)
    push_units = Checked(count)
    speak = Checked(require_type(bool, "True or False"))
