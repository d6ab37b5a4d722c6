"""SIGTERM and SIGINT finish the step, then the loop checkpoints and stops; a second signal stops at once."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from qkvlab.train.distributed import Dist

__all__ = ["GracefulStop"]


class GracefulStop:
    """SIGTERM/SIGINT set a flag the loop reads after each step (main thread only: elsewhere Python
    cannot install handlers, and the signals keep their usual effect). A second signal, a second or
    more after the first, stops at once."""

    def __init__(self, main: bool) -> None:
        self.signum = 0
        self.when = 0.0
        self.main = main
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            # The same signal again within a second is one event delivered twice (a grid run whose
            # parent dies gets its parent-death SIGTERM once per thread of the parent), not a user
            # asking to stop at once.
            if signum == self.signum and time.monotonic() - self.when < 1.0:
                return
            self.restore()
            raise KeyboardInterrupt
        self.signum, self.when = signum, time.monotonic()
        if self.main:
            print(
                f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def requested(self, ddp: Dist, device: torch.device) -> int:
        """The signal to stop on (0: none); under DDP the largest any rank received, so all agree."""
        if ddp.world_size == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
