"""Beyond the papers: ``qkvlab repro logits``, whether weight decay on attention holds logits down as QK-clip does.

The questions (issue 34; answered in FINDINGS.md §3 with the seed spread): does attention weight decay
hold the largest attention logits down as well as QK-clip does, and at what cost in rank and loss? Does
QK-clip change rank at all? Does Muon need clipping where AdamW with decay does not? Paper 000's
theory links them: for every head σ₁(W_KᵀW_Q) ≤ ‖W_KᵀW_Q‖_* ≤ ½(‖W_Q‖² + ‖W_K‖²), so decay on the
factors bounds the largest logit through the nuclear norm (docs/logits.md).

Everything below was fixed before any run of this experiment, and is kept in code so the command
reproduces it. (A first version was revised after a review, still before any run: one common rate
for both optimisers, a tighter loss tolerance, the logit measured on every step of every run, decay
on W_Q and W_K only, the readings below, and stopped runs counted. A second review, still before any
run, found the seed-paired readings dropping a stopped run: they now count it, see Readings; and the
pilot no longer grows a ladder whose rate cannot become the common one. A third, still before any run:
the grid is not run where the pilot finds no logit growth, and ``--set`` refuses the keys the design
fixes.)

**Setting.** The Shakespeare GPT of ``repro wd-rank`` and ``repro optimizer-rank`` (4 layers, 4 heads of
d_head 32, 2,000 steps, cosine schedule, gradient clipping 1.0), Muon with ``muon_adjust_lr=
match_rms_adamw`` so that one η means the same for both optimisers. **Weight decay on W_Q and W_K
only** (``DECAYED_ROLES``), the two matrices QK-clip touches; none anywhere else. **Every step of every
run measures its largest logit** (``logit_every=1``: S formed beside the fused kernel, clip or not, so clipped and
unclipped runs are measured alike) and logs it with the loss (``log_every=1``). The spectral monitor
fires every 100 steps (``MONITOR_EVERY``): per-head largest logits and both products' spectra.

**Muon's Newton–Schulz iteration runs in float32** (``muon_ns_dtype``; torch's default is bfloat16). Set
after AdamW's half of the pilot and before any Muon run finished, for cost alone: this machine's CPU has
no native bfloat16, where the iteration on one step's 24 matrices took 1.6 s against 0.07 s in float32 (measured beside two runs), which made a Muon
run 2.7× an AdamW run (an hour). float32 is the more exact arithmetic of the same iteration. AdamW's
pilot runs are unaffected (the key only reaches Muon), so they were kept; their config.json still
records the default.

**The learning rate (a pilot, seed 100, not reported).** For each optimiser, without decay and without
clipping, one run at each of {1, 2, 4, 8} × 1e-3 (``LR_LADDER``). An optimiser's *usable* rate is the
largest on its ladder whose pilot finishes without a non-finite stop and ends within 0.02 nats
(``LOSS_TOLERANCE``) of its best pilot validation loss: the most aggressive rate a user would still
pick, where logits grow most. If that is the ladder's top, the ladder grows by a factor of 2 past it, at
most twice, and the rate is reported as at the edge. **Both optimisers then run at one common rate**,
the smaller of the two usable rates, so that the optimiser comparison is never a comparison of rates;
so a ladder grows only while its rate could still be the common one (not when the other optimiser's
usable rate is lower and settled), and its rate is then reported as at the edge too.

**τ, fixed from the pilot before any study run.** τ = ½ × the largest logit (every step, any head) of
the AdamW pilot at the common rate, to two significant digits (``TAU_FRACTION``), the same for both
optimisers: clipping then binds for AdamW without decay by construction, and whether decay or Muon
keeps a run under it is a result. The Muon pilot's peak over τ is reported beside it. The pilot's logit
growth is the largest logit over its last 100 steps over that over the 100 steps after warm-up; if
AdamW's is below 1.5 (``GROWTH_INFORMATIVE``), logits do not grow in this setting at a rate a user
would pick: that is reported as the finding, and the grid below is not run (a third review, before any
run: the questions are about logits that grow, and 36 runs of a setting where they do not would answer
none of them).

**The grid.** {AdamW, Muon} × decay on W_Q, W_K with Σₜη_tλ_t ∈ {0, 1, 3} (λ = budget / Σₜη_t, as in
``repro optimizer-rank``) × QK-clip {off, τ} × seeds {0, 1, 2}: 36 runs.

**Measures** (per run; mean ± std over seeds):

- ``logit_peak``: the largest logit of any head over every step; ``logit_final``: over the last 100
  steps; ``over_tau``: the steps whose largest logit passed τ (with QK-clip: before the clip); the
  per-head trajectories at the monitor's firings are kept for the plot.
- ``clipped_heads``: head-steps QK-clip scaled back (the train lines' ``qk_clipped_heads``, summed).
- ``qk_effective_rank``, ``ov_effective_rank``: means over heads of the final weights' products.
- ``val_loss``: the final validation loss; ``train_tail``: the mean training loss of the last 100 steps.
- ``loss_spikes``: steps after the warm-up (and one window) whose loss exceeds 1.3 × the median of the
  10 steps before them (``SPIKE_FACTOR``, ``SPIKE_WINDOW``); ``loss_jump``: the largest such ratio.
- A run that stops on a non-finite value is counted as stopped (and as over τ), never dropped; its
  largest logit up to the stop is kept.

**Readings** (:func:`readings`; seed-paired, three seeds, so "every seed" is the strongest statement the
data allow, a sign test at p = 0.25). A reading waits until every compared cell has ended on three seeds
(finished or stopped), and reads "pending (n of 3 seeds)" before that, so a folder still running gives no
verdict from the seeds that happen to be done (added before any run):

- *Decay against QK-clip, per optimiser and Σηλ > 0*: the peak logit with decay and no clip minus the
  peak with QK-clip and no decay. Decay holds logits down as well as QK-clip where it is ≤ 0 on every
  seed; a seed whose decay run stopped (and whose clipped run did not) counts as higher, the reverse
  as lower, both stopped as neither. A clipped run's peak is τ plus its largest one-step overshoot
  (measured before the clip), so "as low" means at or under that ceiling, not under τ. Its cost beside clipping's: the same difference in validation loss and QK effective rank.
- *Does QK-clip change rank*: QK effective rank with the clip minus without, per optimiser and Σηλ.
  Predicted before any run: the clip scales a whole head's W_Q and W_K by scalars, which leaves that
  head's effective rank unchanged, so a change can only come through the training after it. Read as
  lower or higher where every seed agrees and the mean is at least 0.1 (``RANK_FLOOR``, of 32),
  otherwise within seed noise; "no verdict" where a compared run stopped (it has no final weights).
- *Does an optimiser need clipping*, per Σηλ without the clip: yes where a majority of the seeds (2
  of 3) pass τ or stop. Muon needs clipping where AdamW with decay does not when that holds for Muon and not for
  AdamW at the same Σηλ.
- *Muon against AdamW* in every cell: peak logit, QK effective rank and validation loss, seed-paired.

If decay at Σηλ = 3 does not bring the unclipped peak down to τ, the loss cost of decay *at equal
logit control* cannot be read off the grid, and the write-up says so.

**A rate given after the pilot (``--rate``, post hoc).** Added after the pilot had run, and not part of
the design above: ``--rate LR`` runs the same grid at LR, a rate of AdamW's pilot ladder, with τ by the
same rule from AdamW's pilot run at LR, where the design's pilot found no growth at its common rate (a
folder whose pilot found growth runs the design's grid and refuses it). The choice is recorded in
``OUT/posthoc.json`` (one rate per folder), and every table of the summary says that the grid is post hoc.
``--rate growing`` names the rule stated before that grid ran: the largest rate of AdamW's pilot ladder
whose logits grow at least 1.5× (``GROWTH_INFORMATIVE``, the design's own floor), which is the issue's "a
learning rate high enough that logits grow".
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sized
from pathlib import Path
from typing import Any

from qkvlab.grid.runner import Run
from qkvlab.repro.optimizer_rank.claim import ATTENTION, VARIANTS, decay_for
from qkvlab.repro.paper000.claim import GPT_BASE
from qkvlab.repro.registry import Experiment, register

__all__ = [
    "OPTIMIZERS",
    "choose_lr",
    "growing_rate",
    "ladders_to_grow",
    "loss_jump",
    "loss_spikes",
    "posthoc",
    "readings",
    "run_experiment",
    "tau_from",
]

OPTIMIZERS = ("adamw", "muon")
SEEDS = (0, 1, 2)  # the design's reported seeds: a reading waits for this many in each compared cell
BUDGETS = (0.0, 1.0, 3.0)
LR_LADDER = (1e-3, 2e-3, 4e-3, 8e-3)
MAX_EXTENSIONS = 2
LOSS_TOLERANCE = 0.02  # nats
TAU_FRACTION = 0.5
GROWTH_INFORMATIVE = 1.5
SELECT_SEED = 100
MONITOR_EVERY = 100
SPIKE_FACTOR = 1.3
SPIKE_WINDOW = 10
TAIL_STEPS = 100
RANK_FLOOR = 0.1  # a change in effective rank (of d_head = 32) smaller than this reads as none
DECAYED_ROLES = ("q", "k")
STOPPED_FILE = "stopped.json"
POSTHOC_FILE = "posthoc.json"

BASE: dict[str, Any] = {
    **GPT_BASE,
    "muon_adjust_lr": "match_rms_adamw",
    "muon_ns_dtype": "float32",
    "weight_decay": 0.0,
    "spectra_every": MONITOR_EVERY,
    "log_every": 1,
    "logit_every": 1,
}


def run_name(point: dict[str, Any], seed: int) -> str:
    clip = f"clip={point['qk_clip']:g}" if point["qk_clip"] else "noclip"
    return f"{point['variant']},sum={point['budget']:g},lr={point['lr']:g},{clip},seed={seed}"


def make_run(optimizer: str, budget: float, lr: float, clip: float, seed: int) -> Run:
    point = {"variant": optimizer, "budget": float(budget), "lr": float(lr), "qk_clip": float(clip)}
    return Run(run_name(point, seed), point, seed)


def overrides(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The run-config keys of one grid point: the optimiser, lr, λ on q and k (0 on v, o and the
    embedding), and QK-clip."""
    variant, lr = point["variant"], float(point["lr"])
    lam = decay_for(base, variant, float(point["budget"]), lr)
    roles = {role: {"weight_decay": lam if role in DECAYED_ROLES else 0.0} for role in ATTENTION}
    roles["embed"] = {"weight_decay": 0.0}
    return {
        **VARIANTS[variant].keys,
        "lr": lr,
        "weight_decay": 0.0,
        "overrides": roles,
        "qk_clip": point["qk_clip"],
    }


# -- the worker ----------------------------------------------------------------------------------


def status(run_dir: Path) -> str:
    from qkvlab.grid.training import train_status

    if (run_dir / STOPPED_FILE).is_file():
        return "complete"  # stopped on a non-finite value: a result, it would stop again
    return train_status(run_dir)


def worker(run_dir: Path, point: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
    from qkvlab.errors import TrainingStopped
    from qkvlab.files import write_atomic
    from qkvlab.grid.training import train_worker

    try:
        train_worker(run_dir, overrides(settings["overrides"], point), seed, settings)
    except TrainingStopped as exc:
        write_atomic(run_dir / STOPPED_FILE, json.dumps({"reason": str(exc)}, indent=1))


# -- what a run gives ------------------------------------------------------------------------------


def _after_warmup(losses: list[float], skip: int) -> range:
    return range(max(skip, SPIKE_WINDOW), len(losses))


def loss_spikes(losses: list[float], skip: int = 0) -> int:
    """How many of ``losses`` (after the first ``skip``) exceed SPIKE_FACTOR × the median of the
    SPIKE_WINDOW before them."""
    return sum(
        1
        for i in _after_warmup(losses, skip)
        if losses[i] > SPIKE_FACTOR * statistics.median(losses[i - SPIKE_WINDOW : i])
    )


def loss_jump(losses: list[float], skip: int = 0) -> float:
    """The largest ratio of a loss (after the first ``skip``) to the median of the SPIKE_WINDOW before it."""
    ratios = [
        losses[i] / statistics.median(losses[i - SPIKE_WINDOW : i]) for i in _after_warmup(losses, skip)
    ]
    return max(ratios) if ratios else math.nan


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """One run reduced to its measures, its largest logit per step and the per-head logits at the
    monitor's firings; for a run that met a non-finite value, ``{"stopped": why, ...}`` with its largest
    logit per step up to the stop; None while unfinished."""
    from qkvlab.grid.training import final_measures, read_metrics, read_training_run, train_tail

    if (run_dir / STOPPED_FILE).is_file():
        train = read_metrics(run_dir)["train"]
        logits = [(x["step"], x["logit_max"]) for x in train if "logit_max" in x]
        return {
            "stopped": json.loads((run_dir / STOPPED_FILE).read_text())["reason"],
            "logit_steps": [s for s, _ in logits],
            "logit_max": [v for _, v in logits],
            "last_step": train[-1]["step"] if train else 0,
        }
    result = read_training_run(run_dir)
    if result is None or not result.get("spectra"):
        return None
    fired = [r for r in result["spectra"] if r.get("logits")]
    train = result["train_curve"]
    final_step = int(result["final"]["step"])
    warmup = int(result["config"].get("warmup_steps", 0))
    logits = [(x["step"], x["logit_max"]) for x in train if "logit_max" in x]
    losses = [x["loss"] for x in train if "loss" in x]
    skip = sum(1 for x in train if x["step"] <= warmup) + SPIKE_WINDOW  # windows wholly after warm-up
    tail = train_tail(train, final_step, TAIL_STEPS)
    measures = final_measures(result)
    measures.update(
        {
            "logit_peak": max((v for _, v in logits), default=math.nan),
            "logit_final": max((v for s, v in logits if s > final_step - TAIL_STEPS), default=math.nan),
            "clipped_heads": float(sum(x.get("qk_clipped_heads", 0) for x in train)),
            "loss_spikes": float(loss_spikes(losses, skip=skip)),
            "loss_jump": loss_jump(losses, skip=skip),
            "train_tail": math.nan if tail is None else tail,
        }
    )
    return {
        "measures": {k: v for k, v in measures.items() if not math.isnan(v)},  # a short run has no jump
        "logit_steps": [s for s, _ in logits],
        "logit_max": [v for _, v in logits],
        "steps": [r["step"] for r in fired],
        "per_head": [r["logits"]["max"] for r in fired],  # [firing][layer][head]
        "warmup": warmup,
    }


# -- the pilot: learning rates and τ -------------------------------------------------------------


def choose_lr(losses: dict[float, float]) -> float:
    """The largest rate whose pilot finished (a finite loss) within LOSS_TOLERANCE nats of the best one."""
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    if not finite:
        raise ValueError("every pilot run stopped on a non-finite value")
    best = min(finite.values())
    return max(lr for lr, loss in finite.items() if loss <= best + LOSS_TOLERANCE)


def ladders_to_grow(usable: dict[str, float], tops: dict[str, float]) -> list[str]:
    """The optimisers whose ladder grows: those whose usable rate is their ladder's top and could still be
    the common (smallest) rate, that is, no optimiser whose rate is settled (below its top) is lower."""
    edge = {o: usable[o] == tops[o] for o in usable}
    settled = {o: usable[o] for o in usable if not edge[o]}
    return [o for o in usable if edge[o] and all(usable[o] <= u for p, u in settled.items() if p != o)]


def tau_from(peak: float) -> float:
    """TAU_FRACTION × the AdamW pilot's largest logit, to two significant digits."""
    value = TAU_FRACTION * peak
    return float(f"{value:.2g}")


def logit_growth(result: dict[str, Any]) -> float | None:
    """The largest logit over the last TAIL_STEPS steps over that over the TAIL_STEPS after warm-up."""
    pairs = list(zip(result["logit_steps"], result["logit_max"], strict=True))
    if not pairs:
        return None
    last, warmup = pairs[-1][0], result.get("warmup", 0)
    early = [v for s, v in pairs if warmup < s <= warmup + TAIL_STEPS]
    late = [v for s, v in pairs if s > last - TAIL_STEPS]
    return max(late) / max(early) if early and late and max(early) > 0 else None


# Keys the design fixes for every run (``overrides`` would replace them silently), and the measuring
# cadence every reading counts on: a train line per step, each with that step's largest logit.
_DESIGN_KEYS = {
    "optimizer": "both optimisers run, by design",
    "lr": "the pilot picks the rate",
    "weight_decay": "decay is set per grid point, on W_Q and W_K only (--budgets)",
    "overrides": "decay is set per grid point, on W_Q and W_K only (--budgets)",
    "qk_clip": "τ comes from the pilot",
    "qk_clip_roles": "QK-clip scales W_Q and W_K, by design",
    "muon_adjust_lr": "one η must mean the same for both optimisers (match_rms_adamw)",
    "muon_per_head": "the design runs Muon on whole matrices",
}
_EVERY_STEP = ("log_every", "logit_every")


def refuse_design_keys(changes: dict[str, Any]) -> None:
    """A UserError for a ``--set`` that the design overrides per run or that would break its readings."""
    from qkvlab.errors import UserError
    from qkvlab.grid.training import refuse_run_keys

    refuse_run_keys(changes, "--set")
    for key, why in _DESIGN_KEYS.items():
        if key in changes:
            raise UserError(f"--set {key}={changes[key]} would be ignored: {why}")
    for key in _EVERY_STEP:
        if key in changes and str(changes[key]) != "1":
            raise UserError(
                f"--set {key}={changes[key]}: the readings count steps, so every step must log its largest "
                f"logit; accepted: {key}=1"
            )
    if "spectra_every" in changes:
        try:
            every = int(changes["spectra_every"])
        except (TypeError, ValueError):
            every = 0
        if every < 1:
            raise UserError(
                f"--set spectra_every={changes['spectra_every']}: the study reads the monitor's per-head logits "
                "and final spectra; accepted: a whole number ≥ 1"
            )


def shared_settings(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"experiment": "logits", "overrides": {**BASE, **(changes or {})}, "lr_ladder": list(LR_LADDER)}


def _grid(out: Path, runs: list[Run], settings: dict[str, Any], jobs: int, echo: Any, stage: str) -> None:
    from qkvlab.grid.runner import run_stage

    run_stage(out, runs, worker, status, settings=settings, jobs=jobs, echo=echo, label="logits", stage=stage)


def _loss(result: dict[str, Any]) -> float:
    return math.inf if "stopped" in result else float(result["measures"]["val_loss"])


def pilot(out: Path, settings: dict[str, Any], jobs: int = 1, echo: Any = print) -> dict[str, Any] | None:
    """Stage 1 (see the module): each optimiser's usable rate, the common rate and τ, written to
    OUT/pilot.json; None while a pilot run is unfinished."""
    from qkvlab.files import write_atomic

    ladders = {o: list(LR_LADDER) for o in OPTIMIZERS}
    results: dict[str, dict[float, dict[str, Any] | None]] = {}
    for extension in range(MAX_EXTENSIONS + 1):
        runs = [make_run(o, 0.0, lr, 0.0, SELECT_SEED) for o in OPTIMIZERS for lr in ladders[o]]
        _grid(out, runs, settings, jobs, echo, "pilot")
        results = {
            o: {lr: read_run(make_run(o, 0.0, lr, 0.0, SELECT_SEED).folder(out)) for lr in ladders[o]}
            for o in OPTIMIZERS
        }
        if any(r is None for by_lr in results.values() for r in by_lr.values()):
            return None
        usable = {o: choose_lr({lr: _loss(r) for lr, r in results[o].items()}) for o in OPTIMIZERS}
        grow = (
            ladders_to_grow(usable, {o: ladders[o][-1] for o in OPTIMIZERS})
            if extension < MAX_EXTENSIONS
            else []
        )
        for o in grow:
            ladders[o].append(usable[o] * 2)
        if not grow:  # the last pass's usable rates are final
            break
    common = min(usable.values())
    at_common = {o: results[o][common] for o in OPTIMIZERS}
    # τ comes from AdamW's run at the common rate; a stopped Muon run there only loses its ratio to τ
    if "stopped" in at_common["adamw"]:
        raise RuntimeError(
            f"AdamW's pilot run at the common rate {common:g} stopped; the design has no τ for it"
        )
    record: dict[str, Any] = {
        o: {
            "usable": usable[o],
            "at_edge": usable[o] == ladders[o][-1],
            "runs": {
                f"{lr:g}": None
                if "stopped" in r
                else {
                    "val_loss": r["measures"]["val_loss"],
                    "logit_peak": r["measures"]["logit_peak"],
                    "logit_growth": logit_growth(r),
                }
                for lr, r in results[o].items()
            },
        }
        for o in OPTIMIZERS
    }
    tau = tau_from(at_common["adamw"]["measures"]["logit_peak"])
    growth = logit_growth(at_common["adamw"])
    record.update(
        {
            "lr": common,
            "tau": tau,
            "muon_peak_over_tau": None
            if "stopped" in at_common["muon"]
            else at_common["muon"]["measures"]["logit_peak"] / tau,
            "adamw_growth": growth,
            "informative": growth is not None and growth >= GROWTH_INFORMATIVE,
        }
    )
    write_atomic(out / "pilot.json", json.dumps(record, indent=1))
    return record


def growing_rate(record: dict[str, Any]) -> float | None:
    """The largest rate of AdamW's pilot ladder whose logits grow at least GROWTH_INFORMATIVE× (finished
    runs only), or None."""
    rates = [
        float(lr)
        for lr, r in record["adamw"]["runs"].items()
        if r is not None and r["logit_growth"] is not None and r["logit_growth"] >= GROWTH_INFORMATIVE
    ]
    return max(rates, default=None)


def posthoc(out: Path, record: dict[str, Any], lr: float | str) -> dict[str, Any]:
    """The grid's rate and τ given after the pilot (``--rate``; see the module), written to
    OUT/posthoc.json; ``lr="growing"`` is :func:`growing_rate`. A UserError for a rate the pilot cannot give
    a τ for, for a folder whose pilot found growth (it runs the design's grid), or for a second rate in one
    folder."""
    from qkvlab.errors import UserError
    from qkvlab.files import write_atomic

    rule = None
    if lr == "growing":
        rule = f"the largest rate of AdamW's pilot ladder whose logits grow at least {GROWTH_INFORMATIVE:g}×"
        found = growing_rate(record)
        if found is None:
            raise UserError(
                f"--rate growing: no rate of AdamW's pilot ladder has logits that grow {GROWTH_INFORMATIVE:g}× or "
                "more; accepted: a rate of the ladder"
            )
        lr = found
    lr = float(lr)
    if record["informative"]:
        raise UserError(
            f"--rate {lr:g}: this folder's pilot found logits that grow at the design's rate {record['lr']:g}, so "
            "it runs the design's grid; accepted: no --rate here"
        )
    key = f"{lr:g}"
    adamw = record["adamw"]["runs"]
    if key not in adamw or adamw[key] is None:
        finished = ", ".join(k for k, r in adamw.items() if r is not None)
        raise UserError(
            f"--rate {key}: τ comes from AdamW's pilot run at the grid's rate, and "
            + ("that run stopped on a non-finite value" if key in adamw else "the pilot has no run there")
            + f"; accepted: one of {finished}"
        )
    path = out / POSTHOC_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier["lr"] != lr:
            raise UserError(
                f"--rate {key}: {out} already holds the post-hoc grid at {earlier['lr']:g}; accepted: --rate "
                f"{earlier['lr']:g}, or another --out"
            )
        return earlier
    muon = record["muon"]["runs"].get(key)
    tau = tau_from(adamw[key]["logit_peak"])
    chosen = {
        "lr": lr,
        "tau": tau,
        "adamw_growth": adamw[key]["logit_growth"],
        "muon_peak_over_tau": None if muon is None else muon["logit_peak"] / tau,
        "design_lr": record["lr"],
        "why": "given with --rate after the pilot, where the design's rule found no logit growth (post hoc)",
        "rule": rule,
    }
    write_atomic(path, json.dumps(chosen, indent=1))
    return chosen


def main_runs(pilot_record: dict[str, Any], budgets: list[float], seeds: list[int]) -> list[Run]:
    """Stage 2 at the common rate, seed by seed (an interrupted grid holds whole seeds first)."""
    tau, lr = pilot_record["tau"], pilot_record["lr"]
    return [
        make_run(o, b, lr, clip, s) for s in seeds for o in OPTIMIZERS for b in budgets for clip in (0.0, tau)
    ]


def run_experiment(
    out: Path,
    seeds: list[int],
    *,
    budgets: list[float] | None = None,
    changes: dict[str, Any] | None = None,
    jobs: int = 1,
    echo: Any = print,
    rate: float | str | None = None,
) -> bool:
    """Both stages into ``out`` (resumable); False while the pilot is unfinished (a run failed). ``rate``
    runs the grid there instead, post hoc (:func:`posthoc`)."""
    from qkvlab.config import load_config

    refuse_design_keys(changes or {})
    settings = shared_settings(changes)
    load_config(None, settings["overrides"])  # a bad --set fails here, before any run
    record = pilot(out, settings, jobs, echo)
    if record is None:
        echo("the pilot is unfinished (a run failed: see its train.log); run again to resume")
        return False
    echo(
        "usable rates: "
        + ", ".join(
            f"{o} {record[o]['usable']:g}" + " (at the ladder's edge)" * record[o]["at_edge"]
            for o in OPTIMIZERS
        )
        + f"; both run at {record['lr']:g}; τ = {record['tau']:g}"
    )
    if rate is not None:
        chosen = posthoc(out, record, rate)
        echo(
            f"post hoc (--rate): the grid runs at {chosen['lr']:g}"
            + (f" ({chosen['rule']})" if chosen.get("rule") else "")
            + f" with τ = {chosen['tau']:g}, not at the design's "
            f"{record['lr']:g}; AdamW's pilot logit growth there: "
            + ("—" if chosen["adamw_growth"] is None else f"{chosen['adamw_growth']:.2f}×")
        )
        _grid(out, main_runs(chosen, list(budgets or BUDGETS), seeds), settings, jobs, echo, "post hoc")
        return True
    if not record["informative"]:
        growth = record["adamw_growth"]
        echo(
            f"AdamW's largest logit grows {'—' if growth is None else f'{growth:.2f}×'} at that rate, below "
            f"{GROWTH_INFORMATIVE:g}×: logits do not grow here, so the study's grid is not run "
            "(the pilot's finding is the result; see the summary; --rate runs it post hoc at a rate of the ladder)"
        )
        return True
    _grid(out, main_runs(record, list(budgets or BUDGETS), seeds), settings, jobs, echo, "main")
    return True


# -- results -------------------------------------------------------------------------------------

COMPARED = ("logit_peak", "logit_final", "qk_effective_rank", "ov_effective_rank", "val_loss", "train_tail")
WINDOW = 10  # steps per point of the stored trajectory (the largest logit of each window)
TOP_HEADS = 3  # heads named per seed in "which heads carry the peak" (a description, not a reading)


def aggregate(out: Path) -> dict[str, Any]:
    """Every (optimiser, budget, clip) cell at the common rate: mean ± std over the reported seeds, stopped
    runs, the seed-paired differences against the same optimiser without decay or clipping, and the
    readings (:func:`readings`)."""
    from qkvlab.grid.runner import load_runs, mean_std, paired, point_key

    summary: dict[str, Any] = {"pilot": None, "cells": [], "readings": []}
    path = out / "pilot.json"
    if not path.is_file():
        return summary
    record = json.loads(path.read_text())
    summary["pilot"] = record
    chosen = out / POSTHOC_FILE
    summary["posthoc"] = json.loads(chosen.read_text()) if chosen.is_file() else None
    tau, lr = grid_rate(summary)
    runs = load_runs(out, read_run)
    base = json.loads((out / "settings.json").read_text())["overrides"]
    budgets = sorted({float(dict(key)["budget"]) for key in runs})

    def found(o: str, budget: float, clip: float) -> dict[int, dict[str, Any]]:
        point = {"variant": o, "budget": float(budget), "lr": float(lr), "qk_clip": float(clip)}
        return {s: r for s, r in runs.get(point_key(point), {}).items() if s != SELECT_SEED}

    for o in OPTIMIZERS:
        reference = found(o, 0.0, 0.0)
        for budget in budgets:
            for clip in (0.0, tau):
                results = found(o, budget, clip)
                if not results:
                    continue
                done = {s: r for s, r in results.items() if "measures" in r}
                names = sorted({n for r in done.values() for n in r["measures"]})
                over = {s: sum(v > tau for v in r["logit_max"]) for s, r in done.items()}
                cell: dict[str, Any] = {
                    "optimizer": o,
                    "budget": budget,
                    "clip": clip,
                    "lr": lr,
                    "lambda": decay_for(base, o, budget, lr),
                    "seeds": sorted(done),
                    "stopped": sorted(_stopped(results)),
                    "stopped_peaks": {
                        str(s): max(r["logit_max"], default=math.nan)
                        for s, r in results.items()
                        if "stopped" in r
                    },
                    "measures": {n: mean_std(_measure(done, n).values()) for n in names},
                    "over_tau": mean_std(over.values()) if over else None,
                    "seeds_over_tau": sum(n > 0 for n in over.values()),  # peak > τ: some step passed it
                    "vs_plain": {n: paired(_measure(done, n), _measure(reference, n)) for n in COMPARED},
                }
                if done:
                    cell.update(_trajectories(done))
                summary["cells"].append(cell)
    summary["readings"] = readings(summary["cells"], tau, lambda o, b, c: found(o, b, tau if c else 0.0))
    return summary


def grid_rate(summary: dict[str, Any]) -> tuple[float, float]:
    """The grid's (τ, lr): the post-hoc choice where there is one, else the design's."""
    chosen = summary.get("posthoc") or summary["pilot"]
    return chosen["tau"], chosen["lr"]


def _measure(results: dict[int, dict[str, Any]], name: str) -> dict[int, float]:
    return {s: r["measures"][name] for s, r in results.items() if name in r.get("measures", {})}


def _sign(diff: dict[str, Any] | None, floor: float = RANK_FLOOR) -> str:
    """Lower or higher where every seed agrees and the mean is at least ``floor``, else within seed
    noise (a − b, seed-paired)."""
    if diff is None:
        return "not run"
    if diff["wins"] == 0 and diff["mean"] <= -floor:
        return "lower on every seed"
    if diff["wins"] == diff["n"] and diff["mean"] >= floor:
        return "higher on every seed"
    return "within seed noise"


def _pending(*groups: Sized) -> str | None:
    """ "pending (n of 3 seeds)" while a compared cell has fewer than ``SEEDS`` runs that ended (finished
    or stopped), else None."""
    from qkvlab.repro.common import pending

    return pending(min(len(g) for g in groups), len(SEEDS))


def _stopped(results: dict[int, dict[str, Any]]) -> set[int]:
    return {s for s, r in results.items() if "stopped" in r}


def _against_clip(peak: dict[str, Any] | None, decay: dict[int, Any], clip: dict[int, Any]) -> str:
    """Decay's peak logit against QK-clip's, seed-paired (decay − clip). A seed whose decay run stopped on a
    non-finite value and whose clipped run did not counts as higher (it did not hold its logits down), the
    reverse as lower; a seed where both stopped as neither, so it blocks "every seed"."""
    higher = (peak["wins"] if peak else 0) + len(_stopped(decay) - _stopped(clip))
    lower = (peak["n"] - peak["wins"] if peak else 0) + len(_stopped(clip) - _stopped(decay))
    seeds = len(set(decay) & set(clip))
    if lower == seeds:
        return "as low as QK-clip or lower"
    if higher == seeds:
        return "higher than QK-clip on every seed"
    return "mixed"


def _no_final(*groups: dict[int, dict[str, Any]]) -> str | None:
    """For a reading of final weights or loss: "no verdict (seeds … stopped)" where a compared run stopped on a
    non-finite value, since a seed-paired verdict over the others would drop it silently."""
    stopped = sorted(set().union(*(_stopped(g) for g in groups)))
    if not stopped:
        return None
    return f"no verdict (seed{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped)"


def _needs(needs: dict[str, bool]) -> str:
    if needs["muon"] and not needs["adamw"]:
        return "Muon needs clipping where AdamW does not"
    if all(needs.values()):
        return "both need it"
    return "neither needs it" if not any(needs.values()) else "AdamW needs it, Muon does not"


def readings(cells: list[dict[str, Any]], tau: float, found: Any) -> list[dict[str, Any]]:
    """The module's pre-registered readings from the cells and ``found(optimiser, budget, clipped)`` →
    seed → run (finished or stopped)."""
    from qkvlab.grid.runner import paired

    def diff(name: str, a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        return paired(_measure(a, name), _measure(b, name))

    index = {(c["optimizer"], c["budget"], bool(c["clip"])): c for c in cells}
    budgets = sorted({c["budget"] for c in cells})
    out: list[dict[str, Any]] = []
    for o in OPTIMIZERS:
        clip_only = found(o, 0.0, True)
        for b in (b for b in budgets if b > 0):
            decay = found(o, b, False)
            if not decay or not clip_only:
                continue
            peak = diff("logit_peak", decay, clip_only)
            out.append(
                {
                    "question": "decay against QK-clip",
                    "optimizer": o,
                    "budget": b,
                    "peak": peak,
                    "val_loss": diff("val_loss", decay, clip_only),
                    "qk_effective_rank": diff("qk_effective_rank", decay, clip_only),
                    "reading": _pending(decay, clip_only) or _against_clip(peak, decay, clip_only),
                }
            )
    for o in OPTIMIZERS:
        for b in budgets:
            clipped, plain = found(o, b, True), found(o, b, False)
            rank = diff("qk_effective_rank", clipped, plain)
            if clipped and plain:
                out.append(
                    {
                        "question": "QK-clip changes QK rank",
                        "optimizer": o,
                        "budget": b,
                        "qk_effective_rank": rank,
                        "ov_effective_rank": diff("ov_effective_rank", clipped, plain),
                        "reading": _pending(clipped, plain) or _no_final(clipped, plain) or _sign(rank),
                    }
                )
    for b in budgets:
        needs, ended = {}, {}
        for o in OPTIMIZERS:
            cell = index.get((o, b, False))
            if cell is not None:  # a majority of the seeds (2 of 3) passed τ or stopped
                ran = len(cell["seeds"]) + len(cell["stopped"])
                needs[o] = 2 * (cell["seeds_over_tau"] + len(cell["stopped"])) > ran
                ended[o] = [*cell["seeds"], *cell["stopped"]]
        if len(needs) == len(OPTIMIZERS):
            out.append(
                {
                    "question": "needs clipping",
                    "budget": b,
                    "needs": needs,
                    "reading": _pending(*ended.values()) or _needs(needs),
                }
            )
    for b in budgets:
        for clipped in (False, True):
            muon, adamw = found("muon", b, clipped), found("adamw", b, clipped)
            if muon and adamw:
                out.append(
                    {
                        "question": "Muon against AdamW",
                        "budget": b,
                        "clip": tau if clipped else 0.0,
                        **{n: diff(n, muon, adamw) for n in ("logit_peak", "qk_effective_rank", "val_loss")},
                        "stopped": {"muon": sorted(_stopped(muon)), "adamw": sorted(_stopped(adamw))},
                    }
                )
    return out


def _trajectories(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The largest logit of any head per WINDOW steps (mean and std over seeds, at the windows every seed
    has), and every head's at the monitor's firings on the lowest seed."""
    from qkvlab.grid.runner import mean_std

    windows: dict[int, dict[int, float]] = {}
    for seed, r in done.items():
        last = max(r["logit_steps"], default=0)
        for step, value in zip(r["logit_steps"], r["logit_max"], strict=True):
            end = min(WINDOW * math.ceil(step / WINDOW), last)
            windows.setdefault(end, {})
            windows[end][seed] = max(windows[end].get(seed, -math.inf), value)
    steps = sorted(t for t, by_seed in windows.items() if len(by_seed) == len(done))
    stats = [mean_std(windows[t].values()) for t in steps]
    first = min(done)
    return {
        "trajectory": {"steps": steps, "mean": [x["mean"] for x in stats], "std": [x["std"] for x in stats]},
        "per_head": {"seed": first, "steps": done[first]["steps"], "max": done[first]["per_head"]},
        "top_heads": {
            str(seed): top_heads(r["per_head"]) for seed, r in sorted(done.items())
        },  # as JSON keys
    }


def top_heads(per_head: list[list[list[float]]], n: int = TOP_HEADS) -> list[list[float]]:
    """The ``n`` heads with the largest logit at any of the monitor's firings (``per_head``: [firing][layer]
    [head]), largest first, as ``[layer, head, logit]``: which heads carry a run's peak."""
    best: dict[tuple[int, int], float] = {}
    for firing in per_head:
        for layer, heads in enumerate(firing):
            for index, value in enumerate(heads):
                best[layer, index] = max(best.get((layer, index), -math.inf), value)
    ranked = sorted(best.items(), key=lambda item: -item[1])[:n]
    return [[layer, index, value] for (layer, index), value in ranked]


def tables(summary: dict[str, Any]) -> str:
    """The pilot, the grid (mean ± std over seeds), the seed-paired differences and the readings, as
    Markdown."""
    from qkvlab.render.tables import diff_text, markdown_table, pm

    record = summary["pilot"]
    if record is None:
        return ""
    rows = []
    for o in OPTIMIZERS:
        for lr, run in record[o]["runs"].items():
            marks = []
            if float(lr) == record[o]["usable"]:
                marks.append("usable, at the ladder's edge" if record[o]["at_edge"] else "usable")
            if float(lr) == record["lr"]:
                marks.append("the study's rate")
            mark = f" ({'; '.join(marks)})" if marks else ""
            if run is None:
                rows.append([o, lr + mark, "stopped (non-finite)", "—", "—"])
                continue
            growth = "—" if run["logit_growth"] is None else f"{run['logit_growth']:.2f}×"
            rows.append([o, lr + mark, f"{run['val_loss']:.4f}", f"{run['logit_peak']:.2f}", growth])
    growth = record["adamw_growth"]
    lines = [
        f"Pilot (seed {SELECT_SEED}, not reported; no decay, no clipping): each optimiser's usable rate is the "
        f"largest within {LOSS_TOLERANCE:g} nats of its best loss; both run at the smaller, {record['lr']:g}. "
        f"τ = {record['tau']:g} is half of AdamW's largest pilot logit there; "
        + (
            "Muon's pilot at that rate stopped on a non-finite value. "
            if record["muon_peak_over_tau"] is None
            else f"Muon's pilot peaks at {record['muon_peak_over_tau']:.2f} τ. "
        )
        + "AdamW's logit growth at that rate: "
        + ("—" if growth is None else f"{growth:.2f}×")
        + (
            ""
            if record["informative"]
            else f" (below {GROWTH_INFORMATIVE:g}×: logits do not grow in this setting at a usable rate, so the "
            "study's grid was not run: that is the finding)"
        )
        + ".",
        "",
        *markdown_table(
            ["optimiser", "lr", "val loss", "largest logit", "growth (last 100 / first 100 after warm-up)"],
            rows,
        ),
    ]
    cells = summary["cells"]
    tau, lr = grid_rate(summary)
    chosen = summary.get("posthoc")
    if chosen is not None:
        growth = chosen["adamw_growth"]
        lines += [
            "",
            f"**Post hoc.** Every table below is of the grid at lr {lr:g}"
            + (f", {chosen['rule']}," if chosen.get("rule") else "")
            + " given with `--rate` after the pilot "
            f"(the design's rule chose {chosen['design_lr']:g} and ran no grid): τ = {tau:g}, half of AdamW's "
            "largest pilot logit at that rate, where AdamW's pilot logit growth is "
            + ("—" if growth is None else f"{growth:.2f}×")
            + (
                ""
                if chosen["muon_peak_over_tau"] is None
                else f" and Muon's pilot peaks at {chosen['muon_peak_over_tau']:.2f} τ"
            )
            + ".",
        ]
    if not cells:
        return "\n".join(lines)

    def head(c: dict[str, Any]) -> list[str]:
        clip = f"τ={c['clip']:g}" if c["clip"] else "off"
        seeds = f"{len(c['seeds'])}" + (f" (+{len(c['stopped'])} stopped)" if c["stopped"] else "")
        return [c["optimizer"], f"{c['budget']:g}", clip, seeds]

    m = lambda c, name, digits=2: pm(c["measures"].get(name), digits)  # noqa: E731
    lines += [
        "",
        "Largest logit of any head (over every step, and over the last 100), steps over τ (before any clip), "
        "head-steps clipped, final effective ranks (mean over heads), validation loss, training loss of the "
        "last 100 steps, loss spikes and the largest jump; mean ± std over seeds.",
        "",
        *markdown_table(
            [
                "optimiser",
                "Σηλ (W_Q, W_K)",
                "QK-clip",
                "seeds",
                "peak logit",
                "final logit",
                "steps over τ",
                "clipped",
                "QK erank",
                "OV erank",
                "val loss",
                "train loss",
                "spikes",
                "largest jump",
            ],
            [
                [
                    *head(c),
                    m(c, "logit_peak"),
                    m(c, "logit_final"),
                    pm(c["over_tau"], 0),
                    m(c, "clipped_heads", 0),
                    m(c, "qk_effective_rank"),
                    m(c, "ov_effective_rank"),
                    m(c, "val_loss", 4),
                    m(c, "train_tail", 4),
                    m(c, "loss_spikes", 1),
                    m(c, "loss_jump", 2),
                ]
                for c in cells
            ],
        ),
        "",
        "Seed-paired differences against the same optimiser without decay and without clipping "
        "(mean ± std, and on how many seeds the difference is > 0).",
        "",
        *markdown_table(
            [
                "optimiser",
                "Σηλ",
                "QK-clip",
                "seeds",
                "Δ peak logit",
                "Δ final logit",
                "Δ QK erank",
                "Δ OV erank",
                "Δ val loss",
                "Δ train loss",
            ],
            [
                [
                    *head(c),
                    *(
                        diff_text(c["vs_plain"][n], 4 if n in ("val_loss", "train_tail") else 2)
                        for n in COMPARED
                    ),
                ]
                for c in cells
                if c["budget"] or c["clip"]
            ],
        ),
    ]
    unclipped = [c for c in cells if not c["clip"] and c.get("top_heads")]
    if unclipped:
        seeds = sorted({int(seed) for c in unclipped for seed in c["top_heads"]})
        lines += [
            "",
            f"Which heads carry the largest logit, without the clip: per seed, the {TOP_HEADS} heads whose "
            "logit was largest at any of the monitor's firings (every `spectra_every` steps), as "
            "L{layer}H{head} logit. A description added after seeds 0 and 1 had run, not one of the readings.",
            "",
            *markdown_table(
                ["optimiser", "Σηλ", *(f"seed {seed}" for seed in seeds)],
                [
                    [
                        c["optimizer"],
                        f"{c['budget']:g}",
                        *(
                            ", ".join(
                                f"L{layer}H{index} {value:.1f}"
                                for layer, index, value in c["top_heads"].get(str(seed), [])
                            )
                            or "—"
                            for seed in seeds
                        ),
                    ]
                    for c in unclipped
                ],
            ),
        ]
    found = summary.get("readings") or []
    d = diff_text
    clip = lambda r: f"τ={r['clip']:g}" if r["clip"] else "off"  # noqa: E731
    sections = (  # (question, caption, headers, one row of a reading)
        (
            "decay against QK-clip",
            "Decay (no clip) against QK-clip (no decay), same optimiser, seed-paired (decay − clip):",
            ["optimiser", "Σηλ", "Δ peak logit", "Δ val loss", "Δ QK erank", "reading"],
            lambda r: [
                r["optimizer"],
                f"{r['budget']:g}",
                d(r["peak"]),
                d(r["val_loss"], 4),
                d(r["qk_effective_rank"]),
                r["reading"],
            ],
        ),
        (
            "QK-clip changes QK rank",
            "QK-clip's effect on rank, same optimiser and Σηλ, seed-paired (clip − no clip):",
            ["optimiser", "Σηλ", "Δ QK erank", "Δ OV erank", "reading"],
            lambda r: [
                r["optimizer"],
                f"{r['budget']:g}",
                d(r["qk_effective_rank"]),
                d(r["ov_effective_rank"]),
                r["reading"],
            ],
        ),
        (
            "needs clipping",
            f"Without the clip, does an optimiser pass τ = {tau:g} (on at least 2 of 3 seeds, a stop counted as passing)?",
            ["Σηλ", *OPTIMIZERS, "reading"],
            lambda r: [
                f"{r['budget']:g}",
                *("yes" if r["needs"][o] else "no" for o in OPTIMIZERS),
                r["reading"],
            ],
        ),
        (
            "Muon against AdamW",
            "Muon against AdamW in the same cell, seed-paired (Muon − AdamW):",
            ["Σηλ", "QK-clip", "Δ peak logit", "Δ QK erank", "Δ val loss", "stopped (not in Δ)"],
            lambda r: [
                f"{r['budget']:g}",
                clip(r),
                d(r["logit_peak"]),
                d(r["qk_effective_rank"]),
                d(r["val_loss"], 4),
                "; ".join(f"{o} seeds {', '.join(map(str, v))}" for o, v in r.get("stopped", {}).items() if v)
                or "none",
            ],
        ),
    )
    for question, caption, headers, row in sections:
        mine = [r for r in found if r["question"] == question]
        if mine:
            lines += ["", caption, "", *markdown_table(headers, [row(r) for r in mine])]
    return "\n".join(lines)


def finish(out: Path, plot: str | None) -> int:
    from qkvlab.grid.training import pack_spectra, publish

    pack_spectra(out)
    summary = aggregate(out)
    from qkvlab.repro.logits.render import plot_logits

    def draw(s: dict[str, Any], folder: Path) -> list[Path]:  # no figure before the pilot has chosen τ
        return plot_logits(s, folder, *grid_rate(s)) if s.get("pilot") else []

    return publish(out, summary, tables(summary), plot, draw)


# -- `qkvlab repro logits` -----------------------------------------------------------------------


def _arguments(parser: Any) -> None:
    from qkvlab.repro.common import add_grid_arguments

    add_grid_arguments(parser, "runs/logits")
    parser.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in BUDGETS),
        help="Σₜ η_t λ_t on the attention matrices (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        default=None,
        metavar="LR",
        help="post hoc: where the pilot found no logit growth at the design's rate, run the grid at LR, a rate "
        "of AdamW's pilot ladder (τ by the same rule), or 'growing': the largest such rate whose logits grow "
        f"{GROWTH_INFORMATIVE:g}× or more; recorded in OUT/posthoc.json, labelled in every table",
    )


def _main(args: Any) -> int:
    from qkvlab.errors import UserError
    from qkvlab.repro.common import nonnegative_list, prepare

    out, seeds, changes = prepare(args, "runs/logits")
    if SELECT_SEED in seeds:
        raise UserError(f"seed {SELECT_SEED} is the pilot's; accepted: --seeds without it")
    budgets = nonnegative_list(args.budgets, "--budgets")
    rate = args.rate
    if rate is not None and rate != "growing":
        from qkvlab.args import POSITIVE

        try:
            rate = float(rate)
        except ValueError:
            rate = math.nan
        if not POSITIVE[0](rate):
            raise UserError(
                f"--rate {args.rate}; accepted: a learning rate of the pilot's ladder (> 0), or 'growing'"
            )
    if not args.summary_only:
        run_experiment(out, seeds, budgets=budgets, changes=changes, jobs=args.jobs, rate=rate)
    return finish(out, args.plot)


def _is_folder(folder: Path) -> bool:
    settings = folder / "settings.json"
    return settings.is_file() and json.loads(settings.read_text()).get("experiment") == "logits"


register(
    Experiment(
        "logits",
        "beyond the papers: whether attention weight decay holds the largest logits down as QK-clip does, "
        "with AdamW and Muon, and at what rank and loss",
        _arguments,
        _main,
        detect=_is_folder,
    )
)
