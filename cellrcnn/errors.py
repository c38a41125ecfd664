"""Mistakes a user can fix from the message alone.

A :class:`UsageError` says what is wrong with a command's options or inputs and how to fix it
(the ``hint``). The ``cellrcnn`` command prints it as one paragraph without a traceback and exits
with status 2; a caller of the Python functions gets an ordinary exception (a ``ValueError``).
"""

from __future__ import annotations


class UsageError(ValueError):
    """A wrong option or input; ``hint`` is the command or setting that fixes it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")
        self.hint = hint
