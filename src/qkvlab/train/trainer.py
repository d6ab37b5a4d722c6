"""The training loop behind ``qkvlab train``: one process, or DDP under torchrun.

Run folder (``config.out``):

    config.json        the resolved TrainConfig
    metrics.jsonl      one line per log/eval event: {"step", "split", "loss", ...}; split "spectra" lines
                       hold the monitor's per-layer summaries ({"L0/qk_erank_mean": ...})
    spectra.jsonl      spectral monitor: the `qkvlab inspect --json` record per firing, plus the
                       predicted and measured per-step decay rates of the factor imbalance and gap
    tb/                TensorBoard scalars (when enabled): train/*, val/*, and spectra/L{layer}/{qk|ov}_{stat}
                       and spectra/{qk|ov}_erank_mean (qkvlab.inspection.summary_metrics), as the HF callback
    checkpoint-*/      see qkvlab.train.checkpoint; `latest` points at the newest
    final.json         written last: the run is complete; {"step", "train_loss", "eval", "spectra" (the
                       final weights' summaries, keyed by their TensorBoard tags), "wall_seconds" (every
                       session's training time, each step counted once: checkpoints carry it over a
                       resume), "session_wall_seconds" (the last session's), ...}

Under torchrun the global batch (``batch_size``) is split across ranks and every rank sees its
slice of the same global batch, so the loss curve matches one process; only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from qkvlab import models, optimizers
from qkvlab.config import TrainConfig, check_resume, dump_config, saved_config
from qkvlab.errors import TrainingInterrupted, TrainingStopped, UserError
from qkvlab.files import open_append, open_lock, refuse_links
from qkvlab.guard import mark_corrected, schedule_weight_decay
from qkvlab.inspection import inspect, summary_metrics
from qkvlab.models import build_model
from qkvlab.monitor import Monitor
from qkvlab.optim import l2_penalty, optimizer_settings, param_groups
from qkvlab.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    write_atomic,
)

if TYPE_CHECKING:
    from qkvlab.data import Dataset

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_train_loss: float | None
    final_eval: dict[str, float]
    wall_seconds: float
    complete: bool


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(config: TrainConfig, ddp: _Dist) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is available; accepted here: device=cpu or auto")
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device("cpu")


def _lr_lambda(config: TrainConfig):
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if config.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


def _model_config(config: TrainConfig, info: dict[str, Any]):
    """The model config with its data-derived fields set by its kind (``qkvlab.models``)."""
    model = config.model
    kind = models.get(model.kind)
    if info["kind"] != kind.data:
        raise UserError(
            f"model.kind={kind.name} needs {kind.data} data, but data={config.data} gives {info['kind']} data"
        )
    kind.fit(model, info)
    return model


def _optimizer(config: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, list[dict]]:
    """The per-role groups and the registry's optimiser over them (``qkvlab.optimizers``)."""
    spec = optimizers.get(config.optimizer)
    settings = optimizer_settings(config.preset, overrides=config.overrides, train=config.train_roles)
    guard = config.rank_guard()
    groups = param_groups(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        regularization="l2" if spec.decay == "loss" else "decoupled",
        per_layer="q,k,v,o" if guard is not None else (),
        **settings,
    )
    mark_corrected(groups, config.corrected_weight_decay)  # the decay each step is base · η_t / η_max
    if guard is not None:
        guard.start(groups)  # the configured attention decay, clipped into [λ_min, λ_max]
    return spec.build(config, model, groups), groups


def _guard_step(
    guard: Any,
    record: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    """One rank-guard firing: rank 0 (which holds the monitor's record) updates every guarded group's λ;
    under DDP the others receive the same values, so every rank decays alike."""
    from qkvlab.guard import broadcast_decay

    logged = guard.update(record, optimizer.param_groups) if record is not None else {}
    broadcast_decay(guard, optimizer.param_groups)  # a no-op in one process
    return logged


class _Logger:
    """metrics.jsonl + TensorBoard on rank 0; no-op elsewhere."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, resumed_at: int | None = None
    ) -> None:
        self.enabled = enabled
        self.file = open_append(run_dir / "metrics.jsonl") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, TensorBoard drops what was logged after the checkpoint (it is logged again)
            purge = resumed_at + 1 if resumed_at is not None else None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def log(self, step: int, split: str, metrics: dict[str, float], note: str | None = None) -> None:
        if not self.enabled:
            return
        extra = {"note": note} if note else {}
        self.file.write(json.dumps({"step": step, "split": split, **metrics, **extra}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)

    def tags(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars whose names are already TensorBoard tags (``spectra/L0/qk_erank_mean``); the
        metrics file gets them as one ``{"step", "split": "spectra", "L0/qk_erank_mean": …}`` line."""
        if not self.enabled:
            return
        split = {key.partition("/")[2]: value for key, value in metrics.items()}
        self.file.write(json.dumps({"step": step, "split": "spectra", **split}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class _GracefulStop:
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

    def requested(self, ddp: _Dist, device: torch.device) -> int:
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


def _clean_debris(run_dir: Path) -> None:
    """What a crash can leave: half-written checkpoint folders and atomic-write temp files."""
    import shutil

    for path in run_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def _truncate_history(run_dir: Path, step: int) -> None:
    """Drop metric and spectra lines logged after ``step`` (the checkpoint resumed from): the run
    logs those steps again, so each step appears once."""
    for name in ("metrics.jsonl", "spectra.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            raise UserError(
                f"cannot resume {run_dir}: {path} is damaged (not UTF-8 text); move it aside to resume "
                "without the history logged so far"
            ) from None
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] > step:
                    continue
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
            keep.append(line)
        if len(keep) != len(lines):
            write_atomic(path, "".join(keep))


def _nonfinite_step(loss: torch.Tensor, grad_norm: torch.Tensor, ddp: _Dist) -> str | None:
    """What is not finite in this step ("loss", "gradient norm"), or None. Under DDP any rank's bad step
    is every rank's (the gradient norm is already all-reduced; the loss is not)."""
    flags = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.detach().float())])
    flags = flags.float()
    if ddp.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, norm_bad = (bool(x) for x in flags.tolist())
    if not (loss_bad or norm_bad):
        return None
    return " and ".join(
        part
        for part, is_bad in (("loss is not finite", loss_bad), ("gradient norm is not finite", norm_bad))
        if is_bad
    )


@torch.no_grad()
def _nonfinite_parameter(model: nn.Module) -> str | None:
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return name
    return None


def _stopped_message(last: Path | None, where: str, allowed: int) -> str:
    """``last``: the newest checkpoint this run verified (resumed from, or written and read back)."""
    kept = (
        f"the last good checkpoint, {last.name}, is kept"
        if last is not None
        else "no checkpoint was written yet"
    )
    return (
        f"training stopped at {where} (max_bad_steps={allowed}); {kept}. Lower lr, raise grad clipping, "
        "use fp32, or allow skipped steps with max_bad_steps=N"
    )


def _reduce_mean(value: torch.Tensor, ddp: _Dist) -> float:
    if ddp.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= ddp.world_size
    return value.item()


@torch.no_grad()
def _evaluate(
    model: nn.Module, dataset: Any, config: TrainConfig, device: torch.device, autocast
) -> dict[str, float]:
    model.eval()
    losses, correct, count = [], 0, 0
    answer_only = bool(getattr(dataset, "info", {}).get("answer_only"))
    gd_step = getattr(dataset, "gd_step", None)  # icl-regression: compare with one step of GD
    gd_errors, gd_distances = [], []
    if gd_step is not None:
        from qkvlab.data.icl import gd_prediction
    for i, batch in enumerate(dataset.eval_batches(max(1, config.batch_size))):
        if config.eval_batches and i >= config.eval_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        losses.append(out["loss"].float().item())
        if gd_step is not None:
            reference = gd_prediction(batch["inputs"].double(), gd_step)
            gd_errors.append((reference - batch["targets"].double()).square().mean().item())
            gd_distances.append((out["prediction"].double() - reference).square().mean().item())
        if "labels" in batch and batch["labels"].ndim == 1:
            correct += (out["logits"].argmax(-1) == batch["labels"]).sum().item()
            count += batch["labels"].numel()
        elif answer_only:  # accuracy on the answer tokens only (the rest are −100)
            mask = batch["labels"] != -100
            correct += (out["logits"].argmax(-1)[mask] == batch["labels"][mask]).sum().item()
            count += mask.sum().item()
    model.train()
    metrics = {"loss": statistics.fmean(losses)} if losses else {}
    if losses and models.get(config.model.kind).perplexity:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    if count:
        metrics["accuracy"] = correct / count
    if gd_errors:  # one GD step with the expected-error-optimal step (data.icl.gd_step_size), same sequences
        metrics["gd_mse"] = statistics.fmean(gd_errors)
        metrics["gd_distance"] = statistics.fmean(gd_distances)  # mean (model − GD prediction)²
    return metrics


def load_run_dataset(config: TrainConfig, world_size: int = 1) -> Dataset:
    """The dataset a run of ``config`` trains on.

    With ``online=true`` it is refused (UserError) before any training if ``max_steps`` goes past
    one pass over the data.
    """
    from qkvlab.data import load_dataset

    dataset = load_dataset(
        config.data,
        seq_len=config.seq_len,
        tokenizer=config.tokenizer,
        vocab_size=config.vocab_size,
        seed=config.seed,
        val_fraction=config.val_fraction,
        icl_dim=config.icl_dim,
        icl_points=config.icl_points,
        icl_noise=config.icl_noise,
        recall_keys=config.recall_keys,
        recall_values=config.recall_values,
        recall_pairs=config.recall_pairs,
        recall_queries=config.recall_queries,
        recall_min_pairs=config.recall_min_pairs,
    )
    if config.online:  # refuse before training, not at the first step past the data
        steps = dataset.max_online_steps(config.batch_size // world_size, world_size)
        if steps is not None and config.max_steps > steps:
            raise UserError(
                f"online=true sees every sample once, but data={config.data} has enough for {steps} steps "
                f"at batch_size={config.batch_size}, and max_steps={config.max_steps}; accepted: "
                f"max_steps <= {steps}, a smaller batch, or online=false"
            )
    return dataset


def train(config: TrainConfig, *, resume: Path | None = None, command: str | None = None) -> TrainResult:
    """Train (or resume) the run ``config`` describes; returns where it ended.

    ``command``: the command line that started it, recorded in ``final.json`` when it is a fresh
    ``qkvlab train`` (a resumed or programmatic run records ``qkvlab train RUN/config.json``, which
    reproduces its settings).

    One run folder has one writer: rank 0 holds an OS lock on ``RUN/.lock`` while it trains (released
    when it returns or its process dies), and a second ``train`` or resume of the same folder is
    refused in one line."""
    run_dir = resume if resume is not None else config.run_dir()
    lock = _RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _train(config, resume, run_dir, command)
    finally:
        if lock is not None:
            lock.release()


class _RunLock:
    """``flock`` on ``RUN/.lock`` (the holder's pid inside, for the message)."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        run_dir.mkdir(parents=True, exist_ok=True)
        # a run folder may come from someone else: no link below it may carry a write elsewhere
        refuse_links(run_dir)
        self.path = run_dir / ".lock"
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

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _train(config: TrainConfig, resume: Path | None, run_dir: Path, command: str | None) -> TrainResult:
    ddp = _init_distributed("cuda" if config.device == "cuda" else "cpu")
    device = _device(config, ddp)
    if config.batch_size % ddp.world_size:
        raise UserError(f"batch_size={config.batch_size} must be divisible by the {ddp.world_size} processes")
    if resume is not None:  # before anything is loaded or written: a resume never rewrites history
        check_resume(saved_config(run_dir), config, run_dir)
    torch.manual_seed(config.seed)

    dataset = load_run_dataset(config, ddp.world_size)
    info = {"kind": dataset.kind, **dataset.info}
    model_cfg = _model_config(config, info)
    model = build_model(model_cfg).to(device)
    optimizer, groups = _optimizer(config, model)
    penalty_in_loss = optimizers.get(config.optimizer).decay == "loss"  # adam-l2: Σ λ/2‖θ‖² in the loss
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    schedule_weight_decay(optimizer.param_groups)
    train_model: nn.Module = model
    if ddp.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    start_step = 0
    last_good: Path | None = None
    earlier_wall = 0.0  # training time of the sessions before this one, up to the checkpoint resumed from
    if resume is not None:
        # newest checkpoint that verifies and loads; each damaged one is named and skipped
        last_good, state = resumable_checkpoint(
            run_dir,
            lambda path: load_checkpoint(path, model, optimizer, scheduler, device),
            echo=lambda line: print(f"{run_dir}: {line}", file=sys.stderr, flush=True),
        )
        start_step = state["step"]
        earlier_wall = float(state.get("wall_seconds", 0.0))
    elif ddp.main:
        if (run_dir / "final.json").exists() or latest_checkpoint(run_dir) is not None:
            raise UserError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir}, or pick another out="
            )
        run_dir.mkdir(parents=True, exist_ok=True)
    if ddp.main:
        dump_config(config, run_dir / "config.json")
    if ddp.world_size > 1:
        dist.barrier()

    if resume is not None and ddp.main:
        _clean_debris(run_dir)
        _truncate_history(run_dir, start_step)  # lines after the checkpoint are logged again
    logger = _Logger(run_dir, ddp.main, config.tensorboard, start_step if resume is not None else None)
    monitor = (
        # the optimiser's own group dicts: loading a checkpoint replaced the ones _optimizer built, and the
        # prediction must read the learning rate the scheduler sets now
        Monitor(model, every=config.spectra_every, out=run_dir / "spectra.jsonl", optimizer=optimizer)
        if ddp.main and config.spectra_every
        else None
    )
    if monitor is not None and resume is not None:
        monitor.load_state_dict(state.get("monitor"))
    guard = config.rank_guard()
    use_bf16 = config.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    per_rank = config.batch_size // ddp.world_size
    stop = min(config.stop_at or config.max_steps, config.max_steps)
    units = "tokens" if dataset.kind == "lm" else "samples"
    per_step_units = config.batch_size * (dataset.info["seq_len"] if dataset.kind == "lm" else 1)
    bar = None
    if ddp.main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=start_step, desc=config.name, unit="step", dynamic_ncols=True)

    model.train()
    started = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    last_loss: float | None = None
    last_eval: tuple[int, dict[str, float]] | None = None
    if monitor is not None and start_step == 0:
        monitor.record(0)
        logger.tags(0, monitor.last_summary[1])
    step = start_step
    bad_steps = 0
    # SIGTERM (what schedulers send) and SIGINT finish the current step, write a checkpoint and stop
    # with TrainingInterrupted (the CLI exits 143 / 130); a second signal stops at once.
    signals = _GracefulStop(ddp.main)
    try:
        while step < stop:
            batch = dataset.train_batch(
                step, per_rank, online=config.online, rank=ddp.rank, world_size=ddp.world_size
            )
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                loss = train_model(**batch)["loss"]
            objective = loss + l2_penalty(groups) if penalty_in_loss else loss
            objective.backward()
            if config.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]
                )
            bad = _nonfinite_step(loss, grad_norm, ddp)  # one sync per step; the same answer on every rank
            if bad is None:
                optimizer.step()
                if monitor is not None:
                    monitor.accumulate()  # with this step's lr, before the scheduler moves it
            else:
                bad_steps += 1
                where = f"step {step + 1}: {bad}"
                if bad_steps > config.max_bad_steps:
                    logger.close()
                    raise TrainingStopped(_stopped_message(last_good, where, config.max_bad_steps))
                logger.log(step + 1, "skipped", {"bad_steps": bad_steps}, note=bad)
                if ddp.main:
                    print(
                        f"{run_dir}: skipped {where} ({bad_steps} of max_bad_steps={config.max_bad_steps})",
                        file=sys.stderr,
                    )
            scheduler.step()
            schedule_weight_decay(optimizer.param_groups)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1

            if step % config.log_every == 0 or step == stop:
                last_loss = _reduce_mean(loss.detach().float(), ddp)
                elapsed = time.perf_counter() - window_start
                rate = window_steps * per_step_units / elapsed if elapsed > 0 else float("nan")
                logger.log(
                    step,
                    "train",
                    {"loss": last_loss, "lr": scheduler.get_last_lr()[0], f"{units}_per_s": rate},
                )
                if bar is not None:
                    bar.set_postfix({"loss": f"{last_loss:.4f}", f"{units}/s": f"{rate:,.0f}"})
                window_start, window_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps) and ddp.main:
                last_eval = (step, _evaluate(model, dataset, config, device, autocast))
                logger.log(step, "val", last_eval[1])
            if config.spectra_every and (step % config.spectra_every == 0 or step == config.max_steps):
                record = None
                if monitor is not None:
                    record = monitor.record(step)
                    logger.tags(step, monitor.last_summary[1])
                if guard is not None:  # each layer's attention decay, from this firing's ranks
                    logger.log(step, "guard", _guard_step(guard, record, optimizer))
            # a stop signal is honoured after a whole step, on every rank at the same step; the last
            # step of the run completes as usual
            interrupt = signals.requested(ddp, device) if step < config.max_steps else 0
            if interrupt or step % config.checkpoint_every == 0 or step == stop:
                broken = _nonfinite_parameter(model)  # never into a checkpoint; the last good one stays
                if broken is not None:
                    logger.close()
                    raise TrainingStopped(
                        _stopped_message(last_good, f"step {step}: parameter {broken} is not finite", 0)
                    )
                if ddp.main:
                    last_good = save_checkpoint(
                        run_dir,
                        step,
                        model,
                        optimizer,
                        scheduler,
                        {
                            "data_position": {"step": step},
                            "wall_seconds": earlier_wall + time.perf_counter() - started,
                            **({"monitor": monitor.state_dict()} if monitor else {}),
                        },
                        model_cfg.hf_config(),
                        keep=config.keep_checkpoints,
                    )
                if ddp.world_size > 1:
                    dist.barrier()
            if interrupt:
                logger.close()
                if bar is not None:
                    bar.close()
                name = signal.Signals(interrupt).name
                raise TrainingInterrupted(
                    interrupt,
                    f"stopped by {name} after step {step}; checkpoint-{step:08d} written, no final.json; "
                    f"resume with: qkvlab train --resume {run_dir}",
                )
    finally:
        signals.restore()
    if bar is not None:
        bar.close()
    session_wall = time.perf_counter() - started
    wall = earlier_wall + session_wall
    complete = step >= config.max_steps
    final_eval: dict[str, float] = {}
    if ddp.main:
        if complete and last_eval is not None and last_eval[0] == step:
            final_eval = last_eval[1]
        if complete:
            if monitor is not None and monitor.last_summary and monitor.last_summary[0] == step:
                spectra = monitor.last_summary[1]
            else:
                spectra = summary_metrics(inspect(model))
            summary = {
                "schema_version": 1,
                "kind": "training-run",
                # the command that made the run; a resumed or grid run gets one that reproduces its settings
                "command": command
                if command and command.startswith("qkvlab train ") and "--resume" not in command
                else f"qkvlab train {run_dir / 'config.json'}",
                "step": step,
                "train_loss": last_loss,
                "eval": final_eval,
                "spectra": spectra,  # per-layer summaries of the final weights, named as their TensorBoard tags
                # every step once: the sessions before up to the checkpoint resumed from, plus this one
                "wall_seconds": wall,
                "session_wall_seconds": session_wall,
                "device": device.type,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "world_size": ddp.world_size,
                "monitor_seconds": monitor.seconds if monitor is not None else 0.0,
            }
            write_atomic(run_dir / "final.json", json.dumps(summary, indent=1, allow_nan=False))
    logger.close()
    return TrainResult(run_dir, step, last_loss, final_eval, wall, complete)
