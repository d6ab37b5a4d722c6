"""HF Trainer integration: qkvlab parameter groups as the Trainer's optimiser, spectra as its logs.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(create_optimizer(model, args, preset="qv-ratio"), None))
    SpectraCallback.install(trainer, every_n_steps=50)
    trainer.train()

``create_optimizer`` takes the learning rate, weight decay and optimiser class (``args.optim``)
from ``TrainingArguments``, so the Trainer's ``weight_decay`` is honoured (PEFT's
``create_loraplus_optimizer`` silently uses its own ``loraplus_weight_decay`` instead).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from qkvlab.errors import UserError
from qkvlab.guard import corrected_weight_decay as _corrected_decay
from qkvlab.inspection import inspect, summary_metrics
from qkvlab.monitor import Monitor
from qkvlab.optim import optimizer_settings, param_groups, role_set
from qkvlab.spectra import DEFAULT_RTOL

__all__ = [
    "RankGuardCallback",
    "SpectraCallback",
    "create_muon_optimizer",
    "create_optimizer",
    "summary_metrics",
]


def create_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    *,
    preset: str | None = None,
    preset_args: dict[str, float] | None = None,
    corrected_weight_decay: Iterable[str] | str = (),
    **settings: Any,
) -> torch.optim.Optimizer:
    """An optimiser of the class ``args.optim`` names, over qkvlab parameter groups.

    Args:
        model: the model the Trainer trains (a PEFT model is fine).
        args: its ``TrainingArguments``: ``learning_rate`` and ``weight_decay`` are the base
            values of every group; betas/eps/fused come from ``args.optim``.
        preset: a named preset (``qkvlab.optim.PRESETS``), with ``preset_args``.
        corrected_weight_decay: roles (``"q,k,v,o"``, or ``"all"``) whose decay follows the schedule,
            λ_t = λ · η_t/η_max, so a step decays by λ·η_t²/η_max, as ``qkvlab train
            corrected_weight_decay=`` (an AdamW-type ``args.optim`` only: decoupled decay).
        **settings: ``overrides``, ``train``, ``lora_ratio``, ``regularization`` as in
            ``qkvlab.param_groups``; they update the preset's settings.

    The schedule stays the Trainer's: pass ``optimizers=(opt, None)`` and it builds its
    scheduler around this optimiser, scaling every group's lr by the same factor.
    """
    if settings.get("regularization", "decoupled") != "decoupled":
        raise UserError(
            "create_optimizer builds the Trainer's optimiser, and the Trainer never adds qkvlab.l2_penalty to the "
            "loss; accepted: regularization='decoupled' (or build coupled-L2 training in your own loop)"
        )
    options = optimizer_settings(preset, preset_args=preset_args, **settings)
    groups = param_groups(model, lr=args.learning_rate, weight_decay=args.weight_decay, **options)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("lr", "weight_decay")}
    if corrected_weight_decay and "adamw" not in optimizer_cls.__name__.lower():
        raise UserError(
            f"corrected_weight_decay needs decoupled decay; args.optim={args.optim} builds {optimizer_cls.__name__}; "
            "accepted: an AdamW optimiser (adamw_torch, adamw_torch_fused, ...) or create_muon_optimizer"
        )
    return _corrected_decay(
        optimizer_cls(groups, lr=args.learning_rate, **optimizer_kwargs), corrected_weight_decay
    )


def create_muon_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    *,
    per_head: Iterable[str] | str = (),
    adjust_lr: str | None = "match_rms_adamw",
    momentum: float = 0.95,
    ns_dtype: str = "bfloat16",
    preset: str | None = None,
    preset_args: dict[str, float] | None = None,
    corrected_weight_decay: Iterable[str] | str = (),
    **settings: Any,
) -> torch.optim.Optimizer:
    """Muon for the 2-D attention and MLP matrices and AdamW for the rest, over qkvlab parameter groups.

    The optimiser ``qkvlab train optimizer=muon`` uses (:class:`qkvlab.muon.MuonWithAdamW`), for the HF
    Trainer: one optimiser, so the Trainer's one scheduler drives both parts and its checkpoint holds
    both states. Groups, presets and overrides are :func:`create_optimizer`'s; every group's weight decay
    is its own, decoupled (torch's Muon would default to 0.1). LoRA factors, embeddings, norms, biases
    and the task head get AdamW with ``args``' betas and epsilon.

    Args:
        per_head: roles among q, k, v, o (a set or ``"q,k,v,o"``) orthogonalised per head: each head's
            rows of W_Q, W_K, W_V and columns of W_O (nn.Linear layout), head counts read from the
            model (key/value heads under grouped-query attention). Empty: whole matrices.
        adjust_lr: torch's ``adjust_lr_fn``. The default, ``"match_rms_adamw"``, scales Muon's update to
            AdamW's RMS, so the Trainer's one ``learning_rate`` serves both parts; ``"original"`` or None
            is torch's default (Keller Jordan's scaling).
        momentum: Muon's momentum (Nesterov).
        ns_dtype: the Newton–Schulz arithmetic, ``"bfloat16"`` (torch's) or ``"float32"``.
        corrected_weight_decay: roles whose decay follows the schedule, as in :func:`create_optimizer`.
    """
    from qkvlab.muon import MuonWithAdamW, tag_groups

    if settings.get("regularization", "decoupled") != "decoupled":
        raise UserError(
            "create_muon_optimizer decays each group decoupled; accepted: regularization='decoupled'"
        )
    roles = role_set(per_head)
    options = optimizer_settings(preset, preset_args=preset_args, **settings)
    groups = param_groups(model, lr=args.learning_rate, weight_decay=args.weight_decay, **options)
    heads: dict[str, int] = {}
    if roles:
        from transformers.pytorch_utils import Conv1D

        from qkvlab.attention.extract import AttentionFactors
        from qkvlab.attention.sources import load_source

        info = AttentionFactors(load_source(model)).info
        heads = {"q": info.n_heads, "o": info.n_heads, "k": info.n_kv_heads, "v": info.n_kv_heads}
        # Conv1D (GPT-2) stores (in, out): its head axis is not nn.Linear's, and square shapes hide it
        conv = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, Conv1D)}
        for group in groups:
            for p in group["params"] if group["role"] in roles else ():
                if id(p) in conv:
                    raise UserError(
                        f"per-head Muon expects nn.Linear's (out, in) layout; {conv[id(p)]} is a Conv1D "
                        "(in, out); accepted: per_head=() (whole matrices) for this model"
                    )
    try:  # per_head's roles, adjust_lr and ns_dtype are checked where they are used, said in one line
        optimizer = MuonWithAdamW(
            tag_groups(groups, roles, heads),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            momentum=momentum,
            adjust_lr_fn=adjust_lr,
            ns_dtype=ns_dtype,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    return _corrected_decay(optimizer, corrected_weight_decay)


_LAST_INSPECT: weakref.WeakKeyDictionary[nn.Module, tuple[Any, tuple[int, float], Any]] = (
    weakref.WeakKeyDictionary()
)


def _inspect(model: nn.Module, rtol: float, state: Any) -> Any:
    """The attention spectra of the model the Trainer is training, leaving it in the mode it was in.

    SpectraCallback and RankGuardCallback firing at the same step share one measurement: the report is
    kept per model and reused within the same training (``state``, the Trainer's state object, new for
    every ``train()``) at the same ``global_step`` and ``rtol``; no optimiser step falls between two
    callbacks' ``on_step_end``. (The parameters' version counters would not do: fused optimisers
    update in place without bumping them.)"""
    key = (state.global_step, rtol)
    kept = _LAST_INSPECT.get(model)
    if kept is not None and kept[0] is state and kept[1] == key:
        return kept[2]
    was_training = model.training
    report = inspect(model, rtol=rtol)
    model.train(was_training)
    _LAST_INSPECT[model] = (state, key, report)
    return report


class _LogsNext(TrainerCallback):
    """A callback that hands its numbers (``self._pending``) to the Trainer's next log: the loggers
    (TensorBoard, W&B, console) and ``trainer_state.json``'s history."""

    _pending: dict[str, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if self._pending is not None and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = None
        return control


class SpectraCallback(_LogsNext, ExportableState):
    """Every ``every_n_steps`` optimiser steps: inspect the model's attention spectra (a :class:`qkvlab.Monitor`).

    Writes one line per firing to ``{output_dir}/spectra.jsonl`` in the versioned series format of
    :mod:`qkvlab.monitor` (``{"series_version", "step", "epoch", **inspect-record}``, plus the predicted and
    measured decay rates of the factor imbalance and gap, the prediction read from the Trainer's optimiser);
    ``qkvlab report OUTPUT_DIR`` draws it against the step.

    Where the numbers go:

    * **TensorBoard** (``report_to`` includes it, and the callback was added with :meth:`install`): every
      layer's summaries, ``spectra/L{layer}/{qk|ov}_{erank_mean,erank_min,rank_mean,stable_rank_mean,
      nuclear_norm_mean,gap_mean,imbalance_mean}`` (see ``qkvlab.inspection.summary_metrics``), the
      model-wide means and the decay rates, written through the Trainer's own ``SummaryWriter``: one run.
    * **The Trainer's log** (console, W&B, MLflow, ``trainer_state.json``): only the keys in ``console``,
      by default the model-wide ``spectra/{qk|ov}_erank_mean``, plus ``spectra/L{layer}/{qk|ov}_nonfinite_heads``
      for any layer with non-finite heads. ``per_layer=True`` sends every summary there too (14 keys per
      layer, which the console prints in full at every firing).

    The summaries reach the Trainer's loggers only if this callback runs before them: use
    ``SpectraCallback.install(trainer, ...)``, which puts it first. Passed through ``Trainer(callbacks=[...])``
    it lands after the reporting callbacks and cannot find the Trainer's TensorBoard writer; then only the
    JSON lines and ``trainer_state.json`` get the numbers.

    The monitor's state (the predicted rate's accumulator and the last firing's per-head values) is saved
    in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``), so ``train(resume_from_checkpoint=…)``
    predicts and measures as an uninterrupted run would, whatever ``restore_callback_states_from_checkpoint`` says.
    """

    DEFAULT_CONSOLE = ("spectra/qk_erank_mean", "spectra/ov_erank_mean")

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        rtol: float = DEFAULT_RTOL,
        filename: str = "spectra.jsonl",
        per_layer: bool = False,
        console: Iterable[str] = DEFAULT_CONSOLE,
    ) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.rtol = rtol
        self.filename = filename
        self.per_layer = per_layer
        self.console = tuple(console)
        self.monitor: Monitor | None = None
        self._restored: dict[str, Any] | None = None
        self._tensorboard: Any = None  # the Trainer's TensorBoardCallback, found by install()
        self._pending: dict[str, float] | None = None

    def state(self) -> dict[str, Any]:
        """For the Trainer's checkpoints (``ExportableState``): the arguments, and the monitor's state."""
        return {
            "args": {
                "every_n_steps": self.every_n_steps,
                "rtol": self.rtol,
                "filename": self.filename,
                "per_layer": self.per_layer,
                "console": list(self.console),
            },
            "attributes": {
                "_restored": self.monitor.state_dict() if self.monitor is not None else self._restored
            },
        }

    @classmethod
    def install(cls, trainer: Trainer, every_n_steps: int = 100, **kwargs: Any) -> SpectraCallback:
        callback = cls(every_n_steps, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        from transformers.integrations import TensorBoardCallback

        found = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
        callback._tensorboard = found[0] if found else None
        return callback

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is not None and state.is_world_process_zero:
            if self.monitor is not None:
                self.monitor.close()  # a second train(): the old monitor's hooks off the model
            self.monitor = Monitor(
                model,
                every=self.every_n_steps,
                out=Path(args.output_dir) / self.filename,
                optimizer=optimizer,
                rtol=self.rtol,
            )
            self.monitor.load_state_dict(self._restored or _saved_state(state, type(self).__name__))
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.monitor is not None:
            self.monitor.accumulate()  # this step's lr, before the Trainer's scheduler moves it
        return control

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.monitor is not None:
            self.monitor.close()  # the logit ceiling's hooks off the model, which may go on to inference
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is None or state.global_step % self.every_n_steps:
            return control
        control.should_log = True  # on every rank: the Trainer's logging step gathers the loss across ranks
        if not state.is_world_process_zero:
            return control
        if self.monitor is None or self.monitor.model is not model:  # a Trainer driven without on_train_begin
            if self.monitor is not None:
                self.monitor.close()
            self.monitor = Monitor(
                model, every=self.every_n_steps, out=Path(args.output_dir) / self.filename, rtol=self.rtol
            )
        self.monitor.writer = getattr(self._tensorboard, "tb_writer", None)
        report = _inspect(model, self.rtol, state)
        self.monitor.record(state.global_step, epoch=state.epoch, report=report)
        metrics = self.monitor.last_summary[1]
        self._pending = {
            k: v
            for k, v in metrics.items()
            if self.per_layer or k in self.console or k.endswith("_nonfinite_heads")
        }
        return control


def _saved_state(state: Any, name: str) -> dict[str, Any] | None:
    """The monitor's state in a resumed Trainer's ``trainer_state.json`` (None at a fresh start)."""
    if not state.global_step:
        return None
    saved = getattr(state, "stateful_callbacks", {}).get(name)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved.get("attributes", {}).get("_restored") if isinstance(saved, dict) else None


class RankGuardCallback(_LogsNext):
    """The rank guard (:mod:`qkvlab.guard`) for the HF Trainer: every ``every_n_steps`` optimiser steps,
    each layer's weight decay of (q, k) and of (v, o) follows the smallest effective rank of its heads.

    The Trainer's optimiser must hold qkvlab's groups split by layer::

        optimizer = create_optimizer(model, args, per_layer="q,k,v,o")
        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
        RankGuardCallback.install(trainer, target_qk=0.25, target_ov=0.4, every_n_steps=100)

    λ starts from each group's configured decay (``args.weight_decay`` or its override), clipped into the
    bounds. Under DDP rank 0 measures and every other rank receives its λ values (a broadcast), so all
    ranks decay alike even where their arithmetic differs in the last bit. The
    λ values live in the optimiser's groups, so the Trainer's optimizer checkpoint carries them and
    ``resume_from_checkpoint`` restores them. Each firing adds ``guard/L{layer}/{qk|ov}_lambda`` and
    ``guard/L{layer}/{qk|ov}_erank_min`` to the Trainer's next log (TensorBoard, W&B, console).
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

        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps}")
        self.guard = RankGuard(target_qk, target_ov, kappa, lambda_min, lambda_max)
        self.every_n_steps = every_n_steps
        self.rtol = rtol
        self._pending: dict[str, float] | None = None

    @classmethod
    def install(cls, trainer: Trainer, **kwargs: Any) -> RankGuardCallback:
        """Add the callback first, so its λ values reach the Trainer's loggers at the next log."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if optimizer is None:
            return control
        from qkvlab.guard import guarded_groups

        guarded_groups(optimizer.param_groups, self.guard.targets())  # groups not split by layer: said now
        if state.global_step == 0:  # a resumed run's groups come from its checkpoint, already guarded
            self.guard.start(optimizer.param_groups)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is None or optimizer is None or state.global_step % self.every_n_steps:
            return control
        from qkvlab.guard import broadcast_decay

        logged = {}
        if state.is_world_process_zero:  # under DDP rank 0 measures and the others receive its λ
            report = _inspect(model, self.rtol, state)
            logged = self.guard.update(report.to_dict(), optimizer.param_groups)
        broadcast_decay(self.guard, optimizer.param_groups)
        self._pending = {f"guard/{k}": v for k, v in logged.items()}
        control.should_log = True  # on every rank: the Trainer's logging step gathers the loss across ranks
        return control
