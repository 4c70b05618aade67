"""The one exception type for mistakes a user can fix (bad paths, bad files, bad options).

The command line prints its message as a single line and exits non-zero; anything else that
escapes is a bug in echox and keeps its stack trace.
"""


class EchoXError(Exception):
    """A user-facing error: the message names the file or field and what was expected."""


class ConversationFull(EchoXError):
    """The conversation no longer fits its KV cache of `max_len` positions; a reset or a new session
    continues (a server says so in its own terms: its clients have no reset). `prompt` is the
    positions the prompt needed when it did not fit, None when the answer outgrew the cache: on a
    new conversation either means that the turn itself is too long, which no reset cures."""

    def __init__(self, message: str, *, max_len: int, prompt: int | None = None):
        super().__init__(message)
        self.max_len, self.prompt = max_len, prompt
