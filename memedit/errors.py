"""The one exception type users see: it names the problem and the fix."""

from __future__ import annotations


class MemeditError(Exception):
    """An error the user can fix.

    The CLI prints ``message`` and ``hint`` without a traceback and exits with status 2.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\nHint: {self.hint}"
