"""One exception type for bad input: its message is the single line a user sees (no traceback)."""


class XmxError(RuntimeError):
    """A problem with the user's input (config, data, weights) whose message says what is wrong and how to fix it."""
