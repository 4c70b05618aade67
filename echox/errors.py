"""The one exception type for mistakes a user can fix (bad paths, bad files, bad options).

The command line prints its message as a single line and exits non-zero; anything else that
escapes is a bug in echox and keeps its stack trace.
"""


class EchoXError(Exception):
    """A user-facing error: the message names the file or field and what was expected."""
