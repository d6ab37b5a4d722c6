"""The training loop behind ``qkvlab train``: one process, or several under torchrun or ``srun`` with DDP
(``parallel=ddp``, the default) or FSDP2 (``parallel=fsdp``, see qkvlab.train.fsdp).

Run folder (``config.out``):

    config.json        the resolved TrainConfig
    metrics.jsonl      one line per log/eval event: {"step", "split", "loss", ...}; split "spectra" lines
                       hold the monitor's per-layer summaries ({"L0/qk_erank_mean": ...}); split "logits"
                       the largest attention logit and mean entropy per layer ({"L0/max", "L0/entropy_mean",
                       "max"}), measured on each monitor step's forward pass (qkvlab.logits); train lines
                       add "logit_max" (the largest logit of the steps measured since the last line) with
                       qk_clip (every step; and "qk_clipped_heads") or logit_every (every N-th step)
    spectra.jsonl      spectral monitor: the `qkvlab inspect --json` record per firing, plus the
                       predicted and measured per-step decay rates of the factor imbalance and gap, and
                       "logits": per head, the largest logit and the mean entropy
    tb/                TensorBoard scalars (when enabled): train/*, val/*, logits/*, spectra/L{layer}/{qk|ov}_{stat}
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
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qkvlab import optimizers
from qkvlab.config import TrainConfig, check_resume, dump_config, saved_config
from qkvlab.errors import TrainingInterrupted, TrainingStopped, UserError, is_out_of_memory
from qkvlab.guard import schedule_weight_decay
from qkvlab.inspection import inspect, summary_metrics
from qkvlab.logits import ceiling_scalars, measure_logits, qk_clip
from qkvlab.models import build_model
from qkvlab.monitor import Monitor
from qkvlab.optim import l2_penalty
from qkvlab.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    write_atomic,
)
from qkvlab.train.distributed import end_distributed, init_distributed, reduce_mean, run_device
from qkvlab.train.evaluation import evaluate
from qkvlab.train.fsdp import full, gathered_state, load_sharded_checkpoint, shard
from qkvlab.train.health import nonfinite_parameter, nonfinite_step, stopped_message
from qkvlab.train.history import clean_debris, truncate_history
from qkvlab.train.launch import slurm_environment
from qkvlab.train.lock import RunLock
from qkvlab.train.logger import RunLogger
from qkvlab.train.parts import build_optimizer, guard_step, load_run_dataset, model_config
from qkvlab.train.schedule import lr_lambda
from qkvlab.train.signals import GracefulStop

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_train_loss: float | None
    final_eval: dict[str, float]
    wall_seconds: float
    complete: bool


def train(config: TrainConfig, *, resume: Path | None = None, command: str | None = None) -> TrainResult:
    """Train (or resume) the run ``config`` describes; returns where it ended.

    ``command``: the command line that started it, recorded in ``final.json`` when it is a fresh
    ``qkvlab train`` (a resumed or programmatic run records ``qkvlab train RUN/config.json``, which
    reproduces its settings).

    One run folder has one writer: rank 0 holds an OS lock on ``RUN/.lock`` while it trains (released
    when it returns or its process dies), and a second ``train`` or resume of the same folder is
    refused in one line."""
    os.environ.update(slurm_environment())  # an srun step of several tasks: its ranks, before anything asks
    run_dir = resume if resume is not None else config.run_dir()
    lock = RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        result = _train(config, resume, run_dir, command)
    except (TrainingInterrupted, TrainingStopped):  # every rank stops at the same step
        end_distributed()
        raise
    finally:
        if lock is not None:
            lock.release()
    end_distributed()
    return result


def _train(config: TrainConfig, resume: Path | None, run_dir: Path, command: str | None) -> TrainResult:
    ddp = init_distributed("cuda" if config.device == "cuda" else "cpu")
    device = run_device(config, ddp)
    if config.batch_size % ddp.world_size:
        raise UserError(f"batch_size={config.batch_size} must be divisible by the {ddp.world_size} processes")
    if resume is not None:  # before anything is loaded or written: a resume never rewrites history
        check_resume(saved_config(run_dir), config, run_dir)
    torch.manual_seed(config.seed)

    dataset = load_run_dataset(config, ddp.world_size)
    info = {"kind": dataset.kind, **dataset.info}
    model_cfg = model_config(config, info)
    try:
        model = build_model(model_cfg).to(device)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(exc))
        what = f"one tensor alone needs {int(asked[1]) / 1e9:.3g} GB" if asked else str(exc).splitlines()[0]
        raise UserError(
            f"the model's sizes do not fit in memory on {device} ({what}); accepted: smaller model.n_layer, "
            "model.n_head, model.d_head, model.d_model or model.d_mlp"
        ) from None
    sharded = ddp.world_size > 1 and config.parallel == "fsdp"
    if sharded:  # before the optimiser: its groups hold the sharded parameters
        shard(model, device, ddp.world_size)
    optimizer, groups = build_optimizer(config, model)
    penalty_in_loss = optimizers.get(config.optimizer).decay == "loss"  # adam-l2: Σ λ/2‖θ‖² in the loss
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    schedule_weight_decay(optimizer.param_groups)
    train_model: nn.Module = model
    if ddp.world_size > 1 and not sharded:
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
            lambda path: (
                load_sharded_checkpoint(path, model, optimizer, scheduler)
                if sharded
                else load_checkpoint(path, model, optimizer, scheduler, device)
            ),
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
        clean_debris(run_dir)
        truncate_history(run_dir, start_step)  # lines after the checkpoint are logged again
    logger = RunLogger(run_dir, ddp.main, config.tensorboard, start_step if resume is not None else None)
    # Whole weights are needed to measure or evaluate a sharded model: there every rank takes part (and
    # computes alike); rank 0 writes. Every rank holds a monitor: under DDP only rank 0 measures, but the
    # logit ceiling's input norms come from every rank.
    everyone = ddp.main or sharded
    monitor = (
        # the optimiser's own group dicts: loading a checkpoint replaced the ones _optimizer built, and the
        # prediction must read the learning rate the scheduler sets now
        Monitor(
            model,
            every=config.spectra_every,
            out=run_dir / "spectra.jsonl" if ddp.main else None,
            optimizer=optimizer,
        )
        if config.spectra_every
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
    measured_at = None  # the step the monitor last measured in this session
    if monitor is not None and start_step == 0:
        monitor.record(0)
        measured_at = 0
        if ddp.main:
            logger.tags(0, monitor.last_summary[1])
    step = start_step
    bad_steps = 0
    clip_window = {"heads": 0, "max": -math.inf}  # QK-clip since the last train line
    if resume is not None and state.get("clip_window"):  # a checkpoint between two train lines
        saved = state["clip_window"]
        clip_window = {
            "heads": int(saved["heads"]),
            "max": -math.inf if saved["max"] is None else saved["max"],
        }
    # SIGTERM (what schedulers send) and SIGINT finish the current step, write a checkpoint and stop
    # with TrainingInterrupted (the CLI exits 143 / 130); a second signal stops at once.
    signals = GracefulStop(ddp.main)
    try:
        while step < stop:
            batch = dataset.train_batch(
                step, per_rank, online=config.online, rank=ddp.rank, world_size=ddp.world_size
            )
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # a monitor step's forward pass also measures the attention logits (qkvlab.logits); with
            # QK-clip, every step's does
            firing = bool(config.spectra_every) and (
                (step + 1) % config.spectra_every == 0 or step + 1 == config.max_steps
            )
            measuring = bool(config.qk_clip) or (
                bool(config.logit_every) and (step + 1) % config.logit_every == 0
            )
            armed = firing or measuring
            # the monitor's steps take the entropy too (a softmax of the scores); the others the max only
            with autocast(), measure_logits(model, entropy=firing) if armed else nullcontext() as logits:
                loss = train_model(**batch)["loss"]
            objective = loss + l2_penalty(groups) if penalty_in_loss else loss
            objective.backward()
            if config.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]
                )
            grad_norm = full(grad_norm)  # FSDP: a DTensor
            bad = nonfinite_step(loss, grad_norm, ddp)  # one sync per step; the same answer on every rank
            reached = None
            if measuring:  # every rank: the max over all ranks' slices, good step or not
                logits.reduce()
                reached = logits.scalars().get("max")
                if reached is not None and math.isfinite(reached):
                    clip_window["max"] = max(clip_window["max"], reached)
            if bad is None:
                optimizer.step()
                if measuring and config.qk_clip:  # every rank scales alike
                    clip_window["heads"] += qk_clip(logits, config.qk_clip, config.qk_clip_roles)
                if monitor is not None:
                    monitor.accumulate()  # with this step's lr, before the scheduler moves it
            else:
                bad_steps += 1
                where = f"step {step + 1}: {bad}"
                if reached is not None and not math.isfinite(reached):
                    where += f" (its largest attention logit: {reached})"
                if bad_steps > config.max_bad_steps:
                    if math.isfinite(clip_window["max"]):  # the logits measured since the last line
                        logger.log(step + 1, "train", {"logit_max": clip_window["max"]}, note=bad)
                    logger.close()
                    raise TrainingStopped(stopped_message(last_good, where, config.max_bad_steps))
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
                last_loss = reduce_mean(loss.detach().float(), ddp)
                elapsed = time.perf_counter() - window_start
                rate = window_steps * per_step_units / elapsed if elapsed > 0 else float("nan")
                # the largest logit of the steps measured since the last line (before any clip); with
                # QK-clip, the heads it scaled back over those steps
                clipping = {"logit_max": clip_window["max"]} if math.isfinite(clip_window["max"]) else {}
                if config.qk_clip and clipping:
                    clipping["qk_clipped_heads"] = clip_window["heads"]
                clip_window = {"heads": 0, "max": -math.inf}
                logger.log(
                    step,
                    "train",
                    {"loss": last_loss, "lr": scheduler.get_last_lr()[0], f"{units}_per_s": rate, **clipping},
                )
                if bar is not None:
                    bar.set_postfix({"loss": f"{last_loss:.4f}", f"{units}/s": f"{rate:,.0f}"})
                window_start, window_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps) and everyone:
                last_eval = (step, evaluate(model, dataset, config, device, autocast))
                logger.log(step, "val", last_eval[1])
            if firing:
                record = None
                extra = {}
                if logits.measured:  # every rank: the max and the mean over all ranks' rows
                    logits.reduce()
                    extra = {"logits": logits.to_dict()}
                if monitor is not None:
                    if monitor.ceiling is not None:  # every rank's inputs count (a collective)
                        monitor.ceiling.reduce()
                    record = monitor.record(step, extra=extra)
                    measured_at = step
                    if ddp.main:
                        logger.tags(step, monitor.last_summary[1])
                    elif not sharded and monitor.ceiling is not None:
                        monitor.ceiling.forget()  # rank 0 read them; the next window starts here too
                # measured beside the ceiling from the weights and inputs (qkvlab.logits.LogitCeiling)
                scalars = {
                    **(logits.scalars() if logits.measured else {}),
                    **ceiling_scalars(record.get("logit_ceiling") if record else None),
                }
                if scalars:
                    logger.log(step, "logits", scalars)
                if guard is not None:  # each layer's attention decay, from this firing's ranks
                    logger.log(step, "guard", guard_step(guard, record, optimizer))
            # a stop signal is honoured after a whole step, on every rank at the same step; the last
            # step of the run completes as usual
            interrupt = signals.requested(ddp, device) if step < config.max_steps else 0
            if interrupt or step % config.checkpoint_every == 0 or step == stop:
                broken = nonfinite_parameter(model)  # never into a checkpoint; the last good one stays
                if broken is not None:
                    logger.close()
                    raise TrainingStopped(
                        stopped_message(last_good, f"step {step}: parameter {broken} is not finite", 0)
                    )
                weights, moments = gathered_state(model, optimizer) if sharded else (model, optimizer)
                if monitor is not None and monitor.ceiling is not None:
                    monitor.ceiling.reduce()  # every rank's inputs into the state rank 0 saves
                if ddp.main:
                    last_good = save_checkpoint(
                        run_dir,
                        step,
                        weights,
                        moments,
                        scheduler,
                        {
                            "data_position": {"step": step},
                            "wall_seconds": earlier_wall + time.perf_counter() - started,
                            **({"monitor": monitor.state_dict()} if monitor else {}),
                            # the logits measured since the last train line, which the next one reports
                            "clip_window": {
                                "heads": clip_window["heads"],
                                "max": clip_window["max"] if math.isfinite(clip_window["max"]) else None,
                            },
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
        if monitor is not None:
            monitor.close()  # the logit ceiling's hooks off the model; the monitor's numbers stay
    if bar is not None:
        bar.close()
    session_wall = time.perf_counter() - started
    wall = earlier_wall + session_wall
    complete = step >= config.max_steps
    final_eval: dict[str, float] = {}
    if complete and everyone:
        if measured_at == step:  # the same answer on every rank: a sharded model is measured by all
            spectra = monitor.last_summary[1] if ddp.main else {}
        else:
            spectra = summary_metrics(inspect(model))
    if ddp.main:
        if complete and last_eval is not None and last_eval[0] == step:
            final_eval = last_eval[1]
        if complete:
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
                "parallel": config.parallel if ddp.world_size > 1 else None,
                "monitor_seconds": monitor.seconds if monitor is not None else 0.0,
            }
            write_atomic(run_dir / "final.json", json.dumps(summary, indent=1, allow_nan=False))
    logger.close()
    return TrainResult(run_dir, step, last_loss, final_eval, wall, complete)
