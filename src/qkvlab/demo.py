"""`qkvlab demo` (what `make demo` runs): the whole idea in a few minutes on 2 CPU cores.

1. Train the small char-level Shakespeare GPT three times, with the rest of the model at one weight
   decay (λ_rest = 0.1) and attention weight decay λ_attn equal to it (coupled), 0 (decoupled), and
   large enough that Σₜηₜ·λ_attn ≥ 2 within the demo's steps, the spectral monitor on in each.
   These are `repro wd-rank` runs at a smaller size (one seed), so the page shows the same
   tables and figures as the reproduction, plus the three runs' curves on shared axes.
2. Run the theory toy (paper 000's Fig. 1: gradient descent on factors against the closed form).
3. Inspect the pretrained MiniLM (offline, from its PyPI package).
4. Write the report and print its path as the last line.

Everything is resumable and idempotent: a second `make demo` skips the finished runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["DEMO_CHANGES", "demo_lambdas", "run_demo"]

# The paper-000 GPT setting at demo size: 2 layers of 4 heads (d_head 16), context 64, 600 steps.
DEMO_CHANGES: dict[str, Any] = {
    "seq_len": 64,
    "model.n_layer": 2,
    "model.n_head": 4,
    "model.d_model": 64,
    "model.d_head": 16,
    "model.d_mlp": 256,
    "lr": 3e-3,
    "warmup_steps": 30,
    "max_steps": 600,
    "eval_every": 100,
    "eval_batches": 8,
    "spectra_every": 25,
    "checkpoint_every": 200,
}
THEORY_SETTINGS: dict[str, Any] = {"parts": ("toy",), "optimizers": ()}  # the Fig. 1 toy only
DEMO_REST = 0.1
DEMO_MIN_ETA_LAMBDA = 2.0  # the strong cell's Σₜηₜ·λ_attn is at least this


def demo_lambdas() -> tuple[float, float, float, float]:
    """(coupled, decoupled, strong) λ_attn and Σₜηₜ: the strong one is the smallest whole number with
    Σₜηₜ·λ ≥ DEMO_MIN_ETA_LAMBDA."""
    import math

    from qkvlab.repro.paper000.claim import SETTINGS, schedule_sum

    eta_sum = schedule_sum({**SETTINGS["gpt"].base, **DEMO_CHANGES})
    return DEMO_REST, 0.0, float(math.ceil(DEMO_MIN_ETA_LAMBDA / eta_sum)), eta_sum


def run_demo(out: Path, jobs: int = 2, echo: Any = print) -> Path:
    """Run the demo into ``out``; returns the report's HTML path."""
    from qkvlab.files import write_atomic
    from qkvlab.inspection import inspect
    from qkvlab.report.build import write_report
    from qkvlab.repro.paper000.claim import run_gpt_grid
    from qkvlab.repro.registry import experiments
    from qkvlab.repro.theory.claim import TheorySettings, run_theory

    start = time.perf_counter()
    coupled, decoupled, strong, eta_sum = demo_lambdas()
    echo(
        f"1/4 three GPT runs on shakespeare, λ_rest = {DEMO_REST:g}, Σₜηₜ = {eta_sum:.3f}: λ_attn = "
        f"{coupled:g} (coupled, Σηλ {eta_sum * coupled:.2f}), {decoupled:g} (decoupled), "
        f"{strong:g} (Σηλ {eta_sum * strong:.2f} ≥ {DEMO_MIN_ETA_LAMBDA:g})"
    )
    grid = out / "gpt"
    cells = [(coupled, DEMO_REST), (decoupled, DEMO_REST), (strong, DEMO_REST)]
    run_gpt_grid(grid, cells, [0], jobs=jobs, changes=DEMO_CHANGES, echo=echo)

    echo(f"2/4 theory toy (paper 000, Fig. 1)  [{time.perf_counter() - start:.0f} s]")
    theory_path = out / "theory.json"
    if not theory_path.is_file():
        settings = TheorySettings(**THEORY_SETTINGS)
        result = run_theory(settings)
        result["command"] = settings.command()
        write_atomic(theory_path, json.dumps(result, indent=1, allow_nan=False))

    echo(f"3/4 inspect the pretrained MiniLM  [{time.perf_counter() - start:.0f} s]")
    minilm = out / "minilm.json"
    if not minilm.is_file():
        inspect("minilm").to_json(minilm)

    echo(f"4/4 report  [{time.perf_counter() - start:.0f} s]")
    runs = sorted(d for d in (grid / "runs").iterdir() if (d / "final.json").is_file())
    intro = (
        f"Three runs of a small character-level GPT on Shakespeare (2 layers × 4 heads, d_head 16, "
        f"{DEMO_CHANGES['max_steps']} steps of AdamW), identical except for the weight decay λ_attn on the "
        f"attention matrices q, k, v, o: {coupled:g} (the same as the MLP's, coupled), {decoupled:g} "
        f"(decoupled) and {strong:g}. The schedule's Σₜηₜ is {eta_sum:.3f}, so weight decay has acted for "
        f"Σηλ = {eta_sum * coupled:.2f}, 0 and {eta_sum * strong:.2f}.\n\n"
        "Paper 000 says weight decay on a product of factors, such as W_KᵀW_Q or P·W_V, acts as a "
        "nuclear-norm penalty on the product and so lowers its rank. Read the rank against λ_attn and over "
        "training below (one seed: `qkvlab repro wd-rank` runs the full grid with three), then the theory "
        "toy, where the thresholding σᵢ = max(dᵢ − λ, 0) is exact, then the spectra of a real pretrained "
        "model, MiniLM."
    )
    html, md = write_report(
        [grid, *runs, theory_path, minilm],
        out / "report",
        title="qkvlab demo: what weight decay does to attention rank",
        intro=intro,
        claims=experiments(),
    )
    echo(f"wrote {md}  [{time.perf_counter() - start:.0f} s in all]")
    return html
