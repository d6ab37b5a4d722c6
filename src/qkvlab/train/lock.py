"""One writer per run folder: an OS lock on ``RUN/.lock``."""

from __future__ import annotations

import os
from pathlib import Path

from qkvlab.errors import UserError
from qkvlab.files import open_lock, refuse_links

__all__ = ["CELL_LOCK", "RunLock"]

#: The lock whatever works on a grid's run holds (see RunLock).
CELL_LOCK = ".cell.lock"


class RunLock:
    """``flock`` on ``RUN/.lock`` (the holder's pid inside, for the message). Whatever works on a grid's run
    (a local grid's worker, a Slurm task) holds ``RUN/.cell.lock`` around it, so no run has two at once,
    whatever the worker, and ``qkvlab grid status`` sees it running; the trainer's own lock stays ``.lock``."""

    def __init__(self, run_dir: Path, name: str = ".lock") -> None:
        import fcntl

        run_dir.mkdir(parents=True, exist_ok=True)
        # a run folder may come from someone else: no link below it may carry a write elsewhere
        refuse_links(run_dir)
        self.path = run_dir / name
        self.fd = open_lock(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(
                f"{run_dir} is being written by process {holder}; wait for it, stop it, or pick another out="
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
