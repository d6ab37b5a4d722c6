"""One spectral monitor for every training loop: plain PyTorch, the HF Trainer, Lightning, qkvlab's engine.

A plain loop::

    monitor = qkvlab.Monitor(model, every=200, out="runs/me", optimizer=optimizer,
                             writer=SummaryWriter("runs/me/tb"))     # and/or log=wandb.log
    monitor.record(0)                                                # the initial weights
    for step, batch in enumerate(loader, 1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step)            # after optimizer.step(), before scheduler.step()
        scheduler.step()

Every ``every`` steps it measures the per-head spectra of W_KᵀW_Q and P·W_V (``qkvlab.inspect``), appends one
line to ``spectra.jsonl``, and sends the per-layer summaries to a TensorBoard ``SummaryWriter`` and/or any
``log(metrics, step=…)`` callable (``wandb.log``, ``mlflow.log_metrics``). With the ``optimizer`` it also
predicts how fast weight decay balances the factors (below) and measures it. ``state_dict()`` and
``load_state_dict()`` carry that over a resume. ``qkvlab report runs/me`` draws the series.

**The series format** (``spectra.jsonl``, ``series_version`` 1). One JSON object per line and firing::

    {"series_version": 1, "step": int, "epoch": float | null,
     ... the `qkvlab inspect --json` record ("kind": "inspect", "schema_version", "architecture", "heads", ...),
     "imbalance_decay_per_step": {...}, "gap_decay_per_step": {...},   # with an optimizer
     "guard": {"L0/qk_lambda": ..., ...},                               # with a rank guard
     "logits": {"max": [[per head] per layer], "entropy": [...]},         # qkvlab's engine (qkvlab.logits)
     "logit_ceiling": {"input_norm_max": [per layer], "ceiling": [[per head] per layer], "form": ...}}

Later additions add keys; a reader ignores keys it does not know and refuses a ``series_version`` above
its own. Lines without ``series_version`` (qkvlab before it) are read as version 1.

**The prediction** (weight-decay part only): factors decayed by (1 − ηλ) per step make AᵀA − BᵀB shrink by
(1 − ηλ)² ≈ 1 − 2ηλ, a per-step rate 2ηλ; exact for gradient flow on L(ABᵀ) + (λ/2)(‖A‖² + ‖B‖²)
(t = η·steps), a reference line under Adam/AdamW. The gap ½(‖A‖² + ‖B‖²) − ‖ABᵀ‖_* decays, asymptotically,
at the slowest of 4ηλ (directions that survive) and 2η(λ + dᵢ) (directions thresholded to zero, dᵢ their
signal): between 2ηλ and 4ηλ, and 2ηλ as soon as one direction carries no signal (docs/theory.md).
η and λ are read from the optimiser's groups at every step (schedules, corrected decay and the rank guard
move them) and averaged between firings. Measured: −Δ ln(value)/Δsteps between firings, median over heads.

**The rank guard from a plain loop**: ``Monitor(model, every=100, optimizer=optimizer,
guard=qkvlab.RankGuard(target_qk=0.25))`` adjusts each layer's attention decay at every firing (the
optimiser must hold qkvlab's groups split by layer: ``param_groups(model, per_layer="q,k,v,o")``).

Under ``torch.distributed`` call ``step`` on every rank: rank 0 measures and writes, and the guard's λ values
are broadcast so every rank decays alike.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qkvlab.conventions import DEFAULT_RTOL
from qkvlab.errors import UserError
from qkvlab.files import open_append
from qkvlab.inspection import SERIES_VERSION, read_series_line

if TYPE_CHECKING:
    import torch

    from qkvlab.guard import RankGuard
    from qkvlab.inspection import InspectReport
    from qkvlab.logits import LogitReading

__all__ = ["SERIES_VERSION", "Monitor", "read_series_line"]

PRODUCTS = ("qk", "ov")
_FACTORS = {"qk": ("q", "k"), "ov": ("v", "o")}


class Monitor:
    """Per-head attention spectra every ``every`` optimiser steps, from any training loop (see the module).

    Args:
        model: the model being trained (a PEFT, DDP or compiled wrapper is fine).
        every: fire when ``step % every == 0``.
        out: a folder (the series goes to ``out/spectra.jsonl``) or a ``.jsonl`` path; None writes no file.
        optimizer: the training optimiser, for the predicted decay rates (and the guard's λ).
        writer: a TensorBoard ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``).
        log: a callable taking ``(metrics, step=step)``: ``wandb.log``, ``mlflow.log_metrics``.
        rtol: the threshold of ``rank`` (#σᵢ > rtol·σ₁).
        guard: a :class:`qkvlab.RankGuard` applied at every firing (needs ``optimizer``).
        logit_ceiling: also bound every head's largest attention logit from the weights and the attention
            inputs seen since the last firing (:class:`qkvlab.logits.LogitCeiling`; a forward pre-hook per
            layer, the attention kernel untouched): ``logit_ceiling`` in the series, ``logits/L0/ceiling``
            in TensorBoard.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 200,
        out: str | os.PathLike[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        writer: Any = None,
        log: Callable[..., Any] | None = None,
        rtol: float = DEFAULT_RTOL,
        guard: RankGuard | None = None,
        logit_ceiling: bool = True,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise UserError(f"Monitor every={every!r}; accepted: a positive integer (optimiser steps)")
        if not 0.0 <= rtol < 1.0:
            raise UserError(f"Monitor rtol={rtol}; accepted: 0 <= rtol < 1")
        if guard is not None and optimizer is None:
            raise UserError("Monitor(guard=...) adjusts the optimiser's weight decay; pass optimizer= too")
        self.model = model
        self.every = every
        self.path = None if out is None else _series_path(Path(out))
        self.optimizer = optimizer
        self.writer = writer
        self.log = log
        self.rtol = rtol
        self.guard = guard
        self.seconds = 0.0  # wall time spent measuring, for overhead figures
        self.last_summary: tuple[int, dict[str, float]] | None = None  # (step, summary_metrics)
        self._sum: dict[str, float] = {}
        self._steps = 0
        self._previous: dict[str, dict[tuple[int, str], list[float]]] | None = None
        self._previous_step: int | None = None
        self._factor_groups = _factor_groups(model, optimizer) if optimizer is not None else {}
        self.ceiling = None
        if logit_ceiling:
            from qkvlab.logits import LogitCeiling

            try:
                self.ceiling = LogitCeiling(model)
            except UserError:  # an architecture inspect cannot read: the first firing says so
                self.ceiling = None
        if guard is not None:
            from qkvlab.guard import guarded_groups

            guarded_groups(optimizer.param_groups, guard.targets())  # groups not split by layer: said now
            guard.start(
                optimizer.param_groups
            )  # the configured decay clipped into [λ_min, λ_max] (idempotent)
        if self.path is not None and self.path.is_file():  # a resumed run: measure rates from its last firing
            self._continue_from_file(self.path)

    # -- the loop's calls ------------------------------------------------------------------------------

    def step(
        self, step: int, *, epoch: float | None = None, logits: LogitReading | None = None
    ) -> dict[str, Any] | None:
        """Call once per optimiser step, after ``optimizer.step()`` and before the scheduler moves the
        learning rate. Fires at multiples of ``every``; returns the record written then, else None.
        ``logits``: what :func:`qkvlab.logits.measure_logits` read on this step's forward pass (qkvlab's
        own models), recorded with the firing."""
        self.accumulate()
        if step % self.every:
            return None
        return self.record(step, epoch=epoch, logits=logits)

    def accumulate(self) -> None:
        """Add this step's 2·η_t·λ_t (read from the optimiser's groups now) to the interval's prediction.
        :meth:`step` calls it; a loop that skips a step (a non-finite loss) calls neither."""
        for product in PRODUCTS:
            rate = self._predicted(product)
            if rate is not None:
                self._sum[product] = self._sum.get(product, 0.0) + rate
        self._steps += 1

    def record(
        self,
        step: int,
        *,
        epoch: float | None = None,
        report: InspectReport | None = None,
        extra: Mapping[str, Any] | None = None,
        logits: LogitReading | None = None,
    ) -> dict[str, Any] | None:
        """Measure now (or take ``report``, a measurement of the current weights) and write everywhere.
        Under ``torch.distributed`` only rank 0 measures, except for a model sharded with FSDP, whose
        layers every rank gathers and measures alike (call it on every rank there); only rank 0 records
        and writes; every rank applies the guard's λ. ``extra``: more keys for this firing's line;
        ``logits``: a :class:`qkvlab.logits.LogitReading` of this step's forward pass, reduced over the ranks
        (call it on every rank), recorded as ``logits`` and sent as ``logits/L0/max`` and so on."""
        started = time.perf_counter()
        record = None
        logged: dict[str, float] = {}
        measured: dict[str, float] = {}
        if logits is not None and logits.measured:
            logits.reduce()
            extra = {**(extra or {}), "logits": logits.to_dict()}
            measured = logits.scalars()
        ceiling = None
        if _is_main() or _is_sharded(self.model):
            if report is None:
                from qkvlab.inspection import inspect

                was_training = self.model.training
                report = inspect(self.model, rtol=self.rtol)
                self.model.train(was_training)
            ceiling = self.ceiling.read() if self.ceiling is not None else None
        if _is_main():
            record = {**self._record(report, step, epoch), **(extra or {})}
            if ceiling is not None:
                record["logit_ceiling"] = ceiling
            if self.guard is not None:
                logged = self.guard.update(record, self.optimizer.param_groups)
                record["guard"] = logged
        if self.guard is not None:
            from qkvlab.guard import broadcast_decay

            broadcast_decay(self.guard, self.optimizer.param_groups)  # a no-op in one process
        if record is not None:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open_append(self.path) as fh:
                    fh.write(json.dumps(record) + "\n")
            from qkvlab.logits import ceiling_scalars

            ceilings = {f"logits/{k}": v for k, v in {**measured, **ceiling_scalars(ceiling)}.items()}
            self._send(step, {**self.last_summary[1], **self._rate_scalars(record), **ceilings}, logged)
        self._sum, self._steps = {}, 0
        self.seconds += time.perf_counter() - started
        return record

    # -- resume ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run predicts and measures exactly as an uninterrupted
        one: the 2·η_t·λ_t accumulated since the last firing, that firing's per-head values, and the logit
        ceiling's largest attention-input norms since it (JSON-able; under ``torch.distributed`` call
        ``self.ceiling.reduce()`` on every rank first, so that rank 0's state covers every rank's inputs)."""
        previous = None
        if self._previous is not None:
            previous = {
                name: [[layer, product, values] for (layer, product), values in per_head.items()]
                for name, per_head in self._previous.items()
            }
        return {
            "version": 1,
            "sum": dict(self._sum),
            "steps": self._steps,
            "previous_step": self._previous_step,
            "previous": previous,
            # the logit ceiling's window: the attention inputs' largest norms since the last firing
            "input_norms": self.ceiling.state() if self.ceiling is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output (``None`` or an empty dict: the interval restarts here)."""
        if not state:
            return
        self._sum, self._steps = dict(state.get("sum", {})), int(state.get("steps", 0))
        if self.ceiling is not None:
            self.ceiling.restore(state.get("input_norms"))
        if state.get("previous") is not None:
            self._previous_step = state["previous_step"]
            self._previous = {
                name: {(int(layer), product): list(values) for layer, product, values in rows}
                for name, rows in state["previous"].items()
            }

    def close(self) -> None:
        """Remove the logit ceiling's forward hooks (each Monitor adds one per attention layer, which every
        later forward pass runs, inference too); the series and the state stay readable. Call it when
        training ends, and before building another Monitor for the same model."""
        if self.ceiling is not None:
            self.ceiling.close()

    # -- the parts -------------------------------------------------------------------------------------

    def _continue_from_file(self, path: Path) -> None:
        try:
            lines = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
            if not lines:
                return
            last = read_series_line(lines[-1])
        except (ValueError, UnicodeDecodeError):
            return  # a damaged last line: the next firing starts a new interval, as at the first
        if "heads" in last and "step" in last:
            self._previous_step = last["step"]
            self._previous = {name: _per_head(last["heads"], name) for name in ("imbalance", "gap")}

    def _record(self, report: InspectReport, step: int, epoch: float | None) -> dict[str, Any]:
        from qkvlab.inspection import summary_metrics

        current = {name: _per_head(report.heads, name) for name in ("imbalance", "gap")}
        record: dict[str, Any] = {
            "series_version": SERIES_VERSION,
            "step": step,
            "epoch": epoch,
            **report.to_dict(),
        }
        if self.optimizer is not None:
            predicted = {p: self._interval_prediction(p) for p in PRODUCTS}
            record["imbalance_decay_per_step"] = {
                # mean of 2·η_t·λ_t over the steps since the previous firing (the lr follows the schedule)
                "predicted_weight_decay_part": predicted,
                "measured": self._measured_rates(current["imbalance"], "imbalance", step),
                "note": "predicted = 2·η·λ (exact for gradient flow, a reference line under Adam/AdamW)",
            }
            record["gap_decay_per_step"] = {
                "predicted_range": {p: None if r is None else [r, 2 * r] for p, r in predicted.items()},
                "measured": self._measured_rates(current["gap"], "gap", step),
                "note": "gradient flow: the slowest of 4ηλ (surviving directions) and 2η(λ + dᵢ) (thresholded "
                "ones), so within [2ηλ, 4ηλ], and 2ηλ once a direction carries no signal (docs/theory.md)",
            }
        self._previous, self._previous_step = current, step
        self.last_summary = (step, summary_metrics(report))
        return record

    def _send(self, step: int, metrics: dict[str, float], guard: dict[str, float]) -> None:
        scalars = {**metrics, **{f"guard/{k}": v for k, v in guard.items()}}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.log is not None:
            self.log(scalars, step=step)

    @staticmethod
    def _rate_scalars(record: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in ("imbalance", "gap"):
            block = record.get(f"{name}_decay_per_step")
            if not block:
                continue
            for product, value in block["measured"].items():
                if value is not None:
                    out[f"spectra/{product}_{name}_decay_measured"] = value
            if name == "imbalance":  # the gap's predicted range is [r, 2r] of the same r
                for product, value in block["predicted_weight_decay_part"].items():
                    if value is not None:
                        out[f"spectra/{product}_imbalance_decay_predicted"] = value
        return out

    def _interval_prediction(self, product: str) -> float | None:
        if self._steps == 0 or product not in self._sum:
            return self._predicted(product)
        return self._sum[product] / self._steps

    def _predicted(self, product: str) -> float | None:
        rates = []
        live = self.optimizer.param_groups if self.optimizer is not None else []
        for role in _FACTORS[product]:
            indices = self._factor_groups.get(role)
            if not indices:
                return None  # a frozen factor: no weight-decay-driven balancing
            # by index: the optimiser's load_state_dict replaces its group dicts, so none is kept
            for group in (live[i] for i in indices):  # per-layer groups (rank guard): their mean
                rates.append(2 * group["lr"] * group.get("l2", group.get("weight_decay", 0.0)))
        return statistics.fmean(rates)

    def _measured_rates(self, current: dict, name: str, step: int) -> dict[str, float | None]:
        """−Δ ln(value)/Δsteps since the previous firing, median over heads, per product."""
        measured: dict[str, float | None] = {}
        previous = None if self._previous is None else self._previous.get(name)
        for product in PRODUCTS:
            rates = []
            if previous is not None and step > (self._previous_step or 0):
                for key, values in current.items():
                    if key[1] != product or key not in previous:
                        continue
                    for now, before in zip(values, previous[key], strict=False):
                        if now and before and now > 0 and before > 0:
                            rates.append(-math.log(now / before) / (step - self._previous_step))
            measured[product] = statistics.median(rates) if rates else None
        return measured


def _series_path(out: Path) -> Path:
    return out if out.suffix == ".jsonl" else out / "spectra.jsonl"


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_sharded(model: nn.Module) -> bool:
    from qkvlab.dtensors import is_sharded

    return is_sharded(model)


def _factor_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[int]]:
    """{role: the indices of the optimiser groups that train that attention factor's weight matrix}.

    Matched by parameter identity, so any optimiser works: qkvlab's per-role groups, a plain
    ``AdamW(model.parameters())``, per-layer groups. A fused QKV weight counts for q, k and v. LoRA
    factors do not count: they do not factor W_KᵀW_Q or P·W_V, so no decay prediction is made for them."""
    from qkvlab.optim import roles

    params = dict(model.named_parameters())
    by_id = {
        id(params[name]): role
        for name, role in roles(model).items()
        if name.endswith("weight") and "lora_" not in name and params[name].ndim == 2
    }
    found: dict[str, list[int]] = {}
    for index, group in enumerate(optimizer.param_groups):
        group_roles = set()
        for param in group["params"]:
            role = by_id.get(id(param))
            if role == "qkv":
                group_roles.update("qkv")
            elif role in ("q", "k", "v", "o"):
                group_roles.add(role)
        for role in sorted(group_roles):
            found.setdefault(role, []).append(index)
    return found


def _per_head(heads: list[dict], name: str) -> dict[tuple[int, str], list[float]]:
    """{(layer, product): [value of every head]} for one field of inspect's self-attention head records."""
    out: dict[tuple[int, str], list[float]] = {}
    for rec in heads:
        if rec.get("attention", "self") == "self":
            out.setdefault((rec["layer"], rec["product"]), []).append(rec[name])
    return out
