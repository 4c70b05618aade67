"""The one exception type for mistakes a user can fix (bad paths, bad files, bad options).

The command line prints its message as a single line and exits non-zero; anything else that
escapes is a bug in echox and keeps its stack trace.
"""


class EchoXError(Exception):
    """A user-facing error: the message names the file or field and what was expected."""


class ConversationFull(EchoXError):
    """The conversation no longer fits its KV cache; a reset or a new session continues (a server
    says so in its own terms: its clients have no reset)."""
