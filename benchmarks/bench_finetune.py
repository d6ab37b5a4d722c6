"""Time per step and peak memory of fine-tuning: everything vs QKV vs QV, full vs LoRA.

    .venv/bin/python benchmarks/bench_finetune.py [--model minilm|mpnet] [--steps 20] [--repeats 2]

MiniLM writes BENCHMARKS.md §6, mpnet (110 M parameters, RoBERTa-base's shape) §6b.

Each configuration runs in a fresh process (peak RSS is per process) on rotten-tomatoes,
batch 32 × 64 tokens, AdamW. Seconds per step count forward + backward + optimiser step only.
The peer is full fine-tuning of the whole model, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write_section

CONFIGS = [
    ("full, all parameters (peer)", ["--method", "full", "--targets", "all", "--lr", "5e-5"]),
    ("full, QKV", ["--method", "full", "--targets", "q,k,v", "--lr", "5e-5"]),
    ("full, QV", ["--method", "full", "--targets", "q,v", "--lr", "5e-5"]),
    ("LoRA r=8, QKV", ["--method", "lora", "--targets", "q,k,v", "--lr", "5e-4"]),
    ("LoRA r=8, QV", ["--method", "lora", "--targets", "q,v", "--lr", "5e-4"]),
]


def run(args: list[str], steps: int, model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "qkvlab",
            "finetune",
            "--model",
            model,
            "--data",
            "rotten-tomatoes",
            "--max-steps",
            str(steps),
            "--eval-every",
            str(steps),
            "--max-train-examples",
            "1280",
            "--no-save",
            "--quiet",
            "--out",
            tmp,
            *args,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads((Path(tmp) / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name, _ in CONFIGS}
    for _ in range(args.repeats):
        for name, extra in CONFIGS:
            results[name].append(run(extra, args.steps, args.model))
            r = results[name][-1]
            print(
                f"{name:<32} {r['seconds_per_step'] * 1e3:7.0f} ms/step  {r['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    peer = results[CONFIGS[0][0]]
    peer_t = statistics.median(r["seconds_per_step"] for r in peer)
    peer_m = statistics.median(r["peak_rss_gib"] for r in peer)
    rows = []
    for name, _ in CONFIGS:
        times = [r["seconds_per_step"] * 1e3 for r in results[name]]
        t = statistics.median(times) / 1e3
        m = statistics.median(r["peak_rss_gib"] for r in results[name])
        rows.append(
            f"| {name} | {results[name][0]['trainable_parameters']:,} | {t * 1e3:.0f} ({min(times):.0f}–{max(times):.0f}) | "
            f"{t / peer_t:.2f}× | {m:.2f} | {m / peer_m:.2f}× |"
        )
    med = {
        name: (
            statistics.median(r["seconds_per_step"] for r in runs),
            statistics.median(r["peak_rss_gib"] for r in runs),
        )
        for name, runs in results.items()
    }

    def overlap(a: str, b: str) -> bool:  # do the two configurations' min–max time ranges overlap?
        ta = [r["seconds_per_step"] for r in results[a]]
        tb = [r["seconds_per_step"] for r in results[b]]
        return min(ta) <= max(tb) and min(tb) <= max(ta)

    qv_vs_qkv = " ".join(
        f"{kind}: time {med[f'{kind}, QV'][0] / med[f'{kind}, QKV'][0]:.2f}×"
        + (" (the two time ranges overlap: noise)" if overlap(f"{kind}, QV", f"{kind}, QKV") else "")
        + f", peak RSS {med[f'{kind}, QV'][1] / med[f'{kind}, QKV'][1]:.2f}×."
        for kind in ("full", "LoRA r=8")
    )
    # Adam's state and the gradient: 3 float32 numbers per trained parameter (grad, exp_avg, exp_avg_sq)
    state = {name: runs[0]["trainable_parameters"] * 12 / 2**30 for name, runs in results.items()}

    def base(name: str) -> str:
        return CONFIGS[-1][0] if "LoRA" in name else "full, QV"

    # how far the measured RSS differences stray from the arithmetic: a floor on peak-RSS noise here
    stray = max(abs((med[n][1] - med[base(n)][1]) - (state[n] - state[base(n)])) for n, _ in CONFIGS)
    arithmetic = "\n".join(
        f"| {name} | {state[name]:.3f} | {med[name][1] - med[base(name)][1]:+.3f} | "
        f"{state[name] - state[base(name)]:+.3f} |"
        for name, _ in CONFIGS
    )
    title = {"minilm": "6. Fine-tuning MiniLM", "mpnet": "6b. Fine-tuning mpnet (RoBERTa-base's shape)"}[
        args.model
    ]
    described = {
        "minilm": "MiniLM-L6 (22.7 M parameters)",
        "mpnet": "all-mpnet-base-v2 (MPNet, 12 layers, d 768, 109.5 M parameters)",
    }[args.model]
    embedding = {"minilm": "11.7", "mpnet": "23.4"}[args.model]  # word embeddings: 30,522 × 384, 30,527 × 768
    body = f"""## {title}: time per step and peak memory by target set

Machine: {machine()}.
Command: `.venv/bin/python benchmarks/bench_finetune.py --model {args.model} --steps {args.steps} --repeats {args.repeats}`. {described}
+ classifier on rotten-tomatoes, batch 32, at most 64 tokens (dynamic padding), AdamW; each configuration in a fresh
process, the repeats interleaved, {"median" if args.repeats > 2 else "mean"} of {args.repeats} (min–max in brackets). Shared 2-core machine: absolute
times are noisy. The peer is full fine-tuning of every parameter, in the same run.

| configuration | trainable parameters | ms/step (min–max) | time vs peer | peak RSS (GiB) | memory vs peer |
|---|---|---|---|---|---|
{chr(10).join(rows)}

QV against QKV in this run (paper 001's saving), {qv_vs_qkv}

Peak RSS includes Python, torch, the tokenised data and the model before any optimiser state, so the
optimiser-state savings of QV (2 of 4 attention matrices; Adam keeps 2 floats per trained parameter) are only
part of it; the last table sets them against the arithmetic. The backward pass still runs through every layer whatever is trained,
so time per step falls less than the trainable-parameter count.

How close to the limit: training only some matrices skips the weight-gradient products of the frozen ones, but
never the forward pass or the input-gradient products, which every layer above the lowest trained one needs.
Counting matrix products as forward 1, input gradients 1, weight gradients 1 per weight, and 12·d² weights per
layer (q, k, v, o: 4·d²; MLP: 8·d²), the floor relative to the peer's encoder is (2 + 2/12)/3 ≈ 0.72× for QV
and (2 + 3/12)/3 = 0.75× for QKV (LoRA's products are negligible at r = 8). The peer also runs Adam over the
{embedding} M-parameter word-embedding table and materialises its dense gradient every step, which the attention-only
configurations do not; that is how they come in under those floors.

Memory against the arithmetic: a trained parameter costs its gradient and Adam's two moments, 3 float32
numbers (12 bytes). The table sets each configuration's measured peak RSS beside that arithmetic, both as
differences from QV (full from full QV, LoRA from LoRA QV):

| configuration | grad + Adam state (GiB) | measured RSS − QV's (GiB) | arithmetic − QV's (GiB) |
|---|---|---|---|
{arithmetic}

The measured differences stray from the arithmetic by up to {stray:.3f} GiB: peak-RSS differences smaller than
that are not resolved from noise in this run.
"""
    print(body)
    write_section("finetune" if args.model == "minilm" else "finetune-mpnet", body)


if __name__ == "__main__":
    main()
