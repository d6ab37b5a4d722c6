"""Lightning integration: attention spectra and the rank guard as ``lightning.Trainer`` callbacks.

    trainer = lightning.Trainer(max_steps=1000, callbacks=[
        qkvlab.lightning.SpectraCallback(every_n_steps=100),
        qkvlab.lightning.RankGuardCallback(target_qk=0.25, every_n_steps=100),  # optional
    ])
    trainer.fit(module)

Both are :class:`qkvlab.Monitor` underneath, so the series (``spectra.jsonl``), the decay-rate prediction
(read from the module's optimiser) and the guard's rule are those of every other loop. Every layer's
summaries go to the Trainer's loggers (TensorBoard, CSV, W&B, ...) through ``log_metrics``; the progress
bar shows only the keys in ``console``. Their state rides in Lightning's checkpoints (``state_dict``), and
the guard's λ values live in the optimiser's groups, which Lightning checkpoints too, so
``fit(ckpt_path=...)`` continues exactly. Fired at the same step, the two callbacks share one measurement.
Under DDP rank 0 measures and writes; the guard's λ values are broadcast to every rank.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from qkvlab.conventions import DEFAULT_RTOL
from qkvlab.errors import UserError
from qkvlab.monitor import Monitor

__all__ = ["RankGuardCallback", "SpectraCallback"]

_MEASURED: weakref.WeakKeyDictionary[Any, tuple[tuple[int, float], Any]] = weakref.WeakKeyDictionary()


def _measure(trainer: pl.Trainer, module: pl.LightningModule, rtol: float) -> Any:
    """The current weights' report, measured once per (Trainer, global step, rtol) for both callbacks."""
    from qkvlab.inspection import inspect

    key = (trainer.global_step, rtol)
    kept = _MEASURED.get(trainer)
    if kept is not None and kept[0] == key:
        return kept[1]
    was_training = module.training
    report = inspect(module, rtol=rtol)
    module.train(was_training)
    _MEASURED[trainer] = (key, report)
    return report


def _optimizer(trainer: pl.Trainer) -> Any:
    """The module's first optimiser (with several, the first is taken to hold the attention), or None."""
    return trainer.optimizers[0] if trainer.optimizers else None


class _Fires(pl.Callback):
    """Shared parts: a Monitor built at train start, fed once per optimiser step, fired every N steps."""

    def __init__(self, every_n_steps: int, rtol: float) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise UserError(
                f"every_n_steps={every_n_steps!r}; accepted: a positive integer (optimiser steps)"
            )
        self.every_n_steps = every_n_steps
        self.rtol = rtol
        self.monitor: Monitor | None = None
        self._restored: dict[str, Any] | None = None
        self._fired_at: int | None = None

    def _build(self, trainer: pl.Trainer, module: pl.LightningModule) -> Monitor:
        raise NotImplementedError

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()  # a second fit(): the old monitor's hooks off the model
        self.monitor = self._build(trainer, pl_module)
        self.monitor.load_state_dict(self._restored)
        self._fired_at = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()  # the logit ceiling's hooks off the model, which may go on to inference

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.accumulate()  # the lr this step uses: Lightning moves it after the step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.monitor is None or step == self._fired_at or step % self.every_n_steps:
            return  # not a new optimiser step (gradient accumulation), or not a firing
        self._fired_at = step
        report = _measure(trainer, pl_module, self.rtol) if trainer.is_global_zero else None
        record = self.monitor.record(step, epoch=trainer.current_epoch, report=report)
        if record is not None:
            self._log(trainer, pl_module, step, record)

    def _log(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, record: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict() if self.monitor is not None else self._restored}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("monitor")
        if self.monitor is not None:
            self.monitor.load_state_dict(self._restored)


class SpectraCallback(_Fires):
    """Every ``every_n_steps`` optimiser steps, the per-head spectra of W_KᵀW_Q and P·W_V.

    Args:
        every_n_steps: fire when ``trainer.global_step`` is a multiple of it.
        out: where ``spectra.jsonl`` goes: a folder or a ``.jsonl`` path; default the Trainer's ``log_dir``
            (or ``default_root_dir`` without a logger).
        console: the keys the progress bar shows (the model-wide effective ranks by default); every key goes
            to the loggers.
        rtol: the threshold of ``rank``.
    """

    DEFAULT_CONSOLE = ("spectra/qk_erank_mean", "spectra/ov_erank_mean")

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        out: str | Path | None = None,
        console: Iterable[str] = DEFAULT_CONSOLE,
        rtol: float = DEFAULT_RTOL,
    ) -> None:
        super().__init__(every_n_steps, rtol)
        self.out = out
        self.console = tuple(console)

    def _build(self, trainer: pl.Trainer, module: pl.LightningModule) -> Monitor:
        out = self.out if self.out is not None else (trainer.log_dir or trainer.default_root_dir)
        return Monitor(
            module, every=self.every_n_steps, out=out, optimizer=_optimizer(trainer), rtol=self.rtol
        )

    def _log(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, record: dict) -> None:
        from qkvlab.logits import ceiling_scalars

        ceiling = {f"logits/{k}": v for k, v in ceiling_scalars(record.get("logit_ceiling")).items()}
        scalars = {**self.monitor.last_summary[1], **Monitor._rate_scalars(record), **ceiling}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        for key in self.console:
            if key in scalars:
                module.log(key, scalars[key], prog_bar=True, logger=False, rank_zero_only=True)


class RankGuardCallback(_Fires):
    """The rank guard (:mod:`qkvlab.guard`) for Lightning: every ``every_n_steps`` optimiser steps, each
    layer's weight decay of (q, k) and of (v, o) follows the smallest effective rank of its heads.

    The module's ``configure_optimizers`` must build its optimiser over qkvlab's groups split by layer::

        def configure_optimizers(self):
            return torch.optim.AdamW(qkvlab.param_groups(self, lr=1e-3, weight_decay=0.1, per_layer="q,k,v,o"))

    The λ values (``guard/L{layer}/{qk|ov}_lambda``) and the ranks they followed go to the loggers.
    """

    def __init__(
        self,
        *,
        target_qk: float | None = None,
        target_ov: float | None = None,
        kappa: float = 2.0,
        lambda_min: float = 1e-3,
        lambda_max: float = 10.0,
        every_n_steps: int = 100,
        rtol: float = DEFAULT_RTOL,
    ) -> None:
        from qkvlab.guard import RankGuard

        super().__init__(every_n_steps, rtol)
        self.guard = RankGuard(target_qk, target_ov, kappa, lambda_min, lambda_max)

    def _build(self, trainer: pl.Trainer, module: pl.LightningModule) -> Monitor:
        optimizer = _optimizer(trainer)
        if optimizer is None:
            raise UserError(
                "RankGuardCallback adjusts the optimiser's weight decay; configure_optimizers returned none"
            )
        # the clip into [λ_min, λ_max] at the start is idempotent: a resumed run keeps its restored λ
        return Monitor(
            module, every=self.every_n_steps, optimizer=optimizer, rtol=self.rtol, guard=self.guard
        )

    def _log(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, record: dict) -> None:
        scalars = {f"guard/{k}": v for k, v in record.get("guard", {}).items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
