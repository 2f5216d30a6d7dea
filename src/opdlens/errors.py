"""The one user-facing error type: its message says what is wrong and how to fix it."""


class OpdlensError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it."""
