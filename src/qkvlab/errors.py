"""User-facing errors.

A ``UserError`` is a mistake in what the user asked for (a bad path, an unsupported
model, a value out of range). The CLI prints its message on one line and exits with
code 2, without a traceback. Anything else is our bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message says what was wrong and what is accepted."""


class TrainingStopped(UserError):
    """Training met a non-finite loss, gradient or weight and stopped (the last good checkpoint is
    kept). One line, like a user error: the fix is a setting (learning rate, precision, clipping)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped training after a step, with a checkpoint written (no final.json).
    The CLI exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell would."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError or torch's out-of-memory error, on GPU (``torch.OutOfMemoryError``) or CPU
    (a RuntimeError from the allocator, "can't allocate memory")."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "allocate" in str(exc) and "memory" in str(exc))
    )
