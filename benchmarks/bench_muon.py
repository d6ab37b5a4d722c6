"""Muon's optimiser step: qkvlab's (whole matrices, and per head) against torch.optim.Muon.

    .venv/bin/python benchmarks/bench_muon.py [--repeats 7] [--device cpu|cuda]

Two stacks of attention matrices (W_Q, W_K, W_V, W_O per layer, nn.Linear layout): the optimiser-rank
study's GPT (4 layers, d = 128, 4 heads of 32) and a wider one (2 layers, d = 1024, 16 heads of 64).
Each optimiser steps the same parameters with the same gradients (momentum 0.95, Nesterov, weight
decay 0.1, torch's Newton–Schulz in bfloat16); the figure is the median time of one ``step()``.

- ``torch.optim.Muon``, whole matrices: the peer, ratio 1.
- ``HeadwiseMuon``, whole matrices: the same algorithm through qkvlab's groups (expected ≈ 1×).
- ``HeadwiseMuon``, per head: every head's slice orthogonalised apart, all heads of a matrix in one
  batched Newton–Schulz (3-D ``baddbmm``).
- per head, one head at a time: torch's 2-D function called on each slice in a loop (how qkvlab did it
  before, and what a user writes by hand); only the orthogonalisation is timed, so its ratio is a lower
  bound on the step it would make.

Physical limit: Newton–Schulz on an m × n matrix (m ≤ n) costs 5 × (4m²n + 2m³) flops; the time of
those flops at this machine's measured bfloat16 GEMM rate (a 1024³ bfloat16 matmul) is the floor shown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

sys.path.insert(0, str(Path(__file__).parent))
from qkvlab.muon import HeadwiseMuon, orthogonalize

from _common import machine, median_time, write_section

SHAPES = {
    "study GPT: 4 layers, d = 128, 4 heads of 32": (4, 128, 4),
    "wider: 2 layers, d = 1024, 16 heads of 64": (2, 1024, 16),
}
SETTINGS = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True}


DEVICE = torch.device("cpu")


def _params(layers: int, d: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter((torch.randn(d, d, generator=gen) * d**-0.5).to(DEVICE)) for _ in range(4 * layers)
    ]


def _with_grads(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
    return params


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn``; on a GPU each call is synchronised, so its kernels are counted."""

    def synced() -> None:
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return median_time(synced, repeats, warmup=2)[0]


def _ns_flops(m: int, n: int) -> float:
    m, n = min(m, n), max(m, n)
    return 5 * (4 * m * m * n + 2 * m**3)


def measure(layers: int, d: int, heads: int, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}  # seconds, flops, and whether batched equals the loop bit for bit
    torch_params = _with_grads(_params(layers, d))
    out["torch"] = _timed(torch.optim.Muon(torch_params, **SETTINGS).step, repeats)
    whole = _with_grads(_params(layers, d))
    out["whole"] = _timed(HeadwiseMuon(whole, **SETTINGS).step, repeats)
    per_head = _with_grads(_params(layers, d))
    # W_Q, W_K, W_V split by rows (head_axis 0), W_O by columns (head_axis 1), as the engine groups them.
    groups = [{"params": per_head[i::4], "heads": heads, "head_axis": 1 if i == 3 else 0} for i in range(4)]
    out["per_head"] = _timed(HeadwiseMuon(groups, **SETTINGS).step, repeats)
    coeffs = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    updates = [(p.grad, 1 if i % 4 == 3 else 0) for i, p in enumerate(per_head)]

    def loop() -> None:
        for g, axis in updates:
            for piece in g.chunk(heads, dim=axis):
                _zeropower_via_newtonschulz(piece, coeffs, 5, 1e-7)

    def batched() -> None:
        for g, axis in updates:
            orthogonalize(g, heads, axis)

    out["bitwise"] = all(
        torch.equal(ortho, _zeropower_via_newtonschulz(piece, coeffs, 5, 1e-7))
        for g, axis in updates
        for (ortho, _), piece in zip(orthogonalize(g, heads, axis), g.chunk(heads, dim=axis), strict=True)
    )
    out["loop_ns"] = _timed(loop, repeats)
    out["batched_ns"] = _timed(batched, repeats)
    d_head = d // heads
    out["whole_flops"] = 4 * layers * _ns_flops(d, d)
    out["head_flops"] = 4 * layers * heads * _ns_flops(d_head, d)
    return out


def bf16_gflops(n: int = 1024, repeats: int = 10) -> float:
    """The machine's bfloat16 GEMM ceiling: the fastest of ``repeats`` n³ matmuls (a ceiling, so the
    best time, not the median: a shared machine only ever makes it slower)."""
    a = torch.randn(n, n, device=DEVICE).bfloat16()

    def once() -> None:
        a @ a
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    _, times = median_time(once, repeats, warmup=2)
    return 2 * n**3 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (its section is written apart)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    rate = bf16_gflops()
    rows, same = [], []
    for label, (layers, d, heads) in SHAPES.items():
        r = measure(layers, d, heads, args.repeats)
        ms = lambda t: f"{t * 1e3:,.1f}"  # noqa: E731
        floor_whole, floor_head = r["whole_flops"] / rate / 1e9, r["head_flops"] / rate / 1e9
        rows += [
            f"| {label} | `torch.optim.Muon`, whole matrices | {ms(r['torch'])} | 1.00 | {ms(floor_whole)} |",
            f"| | `HeadwiseMuon`, whole matrices | {ms(r['whole'])} | {r['whole'] / r['torch']:.2f}× | "
            f"{ms(floor_whole)} |",
            f"| | `HeadwiseMuon`, per head (batched Newton–Schulz) | {ms(r['per_head'])} | "
            f"**{r['per_head'] / r['torch']:.2f}×** | {ms(floor_head)} |",
            f"| | per head, one head at a time (Newton–Schulz only) | ≥ {ms(r['loop_ns'])} | "
            f"≥ {r['loop_ns'] / r['torch']:.2f}× | {ms(floor_head)} |",
            f"| | per head, batched (Newton–Schulz only) | {ms(r['batched_ns'])} | "
            f"{r['batched_ns'] / r['torch']:.2f}× ({r['loop_ns'] / r['batched_ns']:.2f}× faster than the loop) | "
            f"{ms(floor_head)} |",
        ]
        same.append(r["bitwise"])
        print("\n".join(rows[-5:]), flush=True)
    gpu = DEVICE.type == "cuda"
    same_text = (
        "bitwise the loop's result" if all(same) else "the loop's result to bfloat16's rounding (not bitwise)"
    )
    gpu_text = (
        "On a GPU one launch per head is the cost the batching removes."
        if gpu
        else "On a GPU, where one launch per head costs more, the batching should matter more: "
        "`--device cuda` measures it (the H200 runs of `repro optimizer-rank`, made with the loop, took "
        "3.5–3.6 minutes against whole-matrix Muon's 2.7, FINDINGS.md §1)."
    )
    where = f"{torch.cuda.get_device_name(DEVICE)} (CUDA); host {machine()}" if gpu else machine()
    flag = " --device cuda" if gpu else ""
    body = f"""## {"7b" if gpu else "7"}. Muon's step{" on a GPU" if gpu else ""}: whole matrices and per head, against `torch.optim.Muon`

Machine: {where}.
Command: `.venv/bin/python benchmarks/bench_muon.py --repeats {args.repeats}{flag}`.
Each optimiser steps the attention matrices (W_Q, W_K, W_V, W_O of every layer) with the same gradients:
momentum 0.95, Nesterov, weight decay 0.1, Newton–Schulz in bfloat16 (torch's coefficients, 5 steps).
Median of {args.repeats} steps; ratio against `torch.optim.Muon` on the whole matrices in the same run.
Floor: the Newton–Schulz flops (5 × (4m²n + 2m³) per m × n matrix, m ≤ n) at this machine's bfloat16
GEMM rate, {rate:,.0f} GFLOP/s (the fastest of 10 1024³ matmuls).

| matrices | optimiser | ms per step (median) | ratio | floor (ms) |
|---|---|---|---|---|
{chr(10).join(rows)}

Per head, each head's d_head × d slice is orthogonalised, which costs fewer flops than the whole
d × d matrix (by about the number of heads), but as many small GEMMs as there are heads: run one head
at a time they are launch- and cache-bound. Batching every head of a matrix into one 3-D Newton–Schulz
(`baddbmm`) gives {same_text} on this machine; the ratios say what it does to the step. Per-head Muon is
a different update from whole-matrix Muon, with about 1/heads of its flops, so its ratio is not a speed-up
on the same work: read it against its own floor. The "Newton–Schulz only" rows time the orthogonalisation
alone, and their ratio divides that by `torch.optim.Muon`'s whole step. {gpu_text}
Absolute times are noisy on shared machines; the ratios are measured in one run.
"""
    write_section("muon-gpu" if gpu else "muon", body)


if __name__ == "__main__":
    main()
