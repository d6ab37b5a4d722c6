"""User-facing errors.

A ``UserError`` is a mistake in what the user asked for (a bad path, an unsupported
model, a value out of range). The CLI prints its message on one line and exits with
code 2, without a traceback. Anything else is our bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message says what was wrong and what is accepted."""
