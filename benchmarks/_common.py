"""Shared helpers for the benchmarks: timing, machine description, BENCHMARKS.md sections.

Each benchmark owns one section of BENCHMARKS.md between markers and rewrites only it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
WORK = ROOT / "benchmarks" / "_work"

_HEADER = """# Benchmarks

Every figure below is written by a script in `benchmarks/` (one command each; `make bench` runs all).
Each section names its machine and command. Times are medians of several runs; ratios compare
against the peer measured in the same run. **The default machine is a shared 2-core VM: absolute
times are noisy (±20 % between runs is normal); the ratios are the figures to trust.**
"""


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = re.search(r"Model name:\s*(.+)", out)
        cpu = name.group(1).strip() if name else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); {_dt.date.today().isoformat()}"
    )


def matmul_gflops_f64(n: int = 1024, repeats: int = 5) -> float:
    """Practical float64 ceiling of this machine: GFLOP/s of a large square matmul."""
    a = torch.randn(n, n, dtype=torch.float64)
    t, _ = median_time(lambda: a @ a, repeats)
    return 2 * n**3 / t / 1e9


def write_section(key: str, body: str) -> None:
    """Replace (or append) the section marked `key` in BENCHMARKS.md."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _HEADER
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
    print(f"updated {BENCHMARKS_MD.name} section '{key}'")
