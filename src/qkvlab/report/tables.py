"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns; floats with 2 decimals (3 significant digits when < 1)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def pm(stats: dict[str, float] | None, digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` of a :func:`qkvlab.experiments.grid.mean_std` result; "—" for none.

    A single value has no spread, so it prints as the bare mean rather than a misleading "± 0".
    """
    if not stats:
        return "—"
    if stats.get("n") == 1:
        return f"{stats['mean'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def sweep_table(points: Sequence[dict]) -> str:
    """One row per sweep grid point: its settings, seeds, final train loss and val metrics (mean ± std)."""
    if not points:
        return "no complete runs yet"
    metrics = sorted({k for p in points for k in p if k == "train_loss" or k.startswith("val_")})
    headers = ["point", "seeds", *metrics]
    rows = [
        [
            ",".join(f"{k}={v}" for k, v in p["point"].items()),
            len(p["seeds"]),
            *(pm(p.get(m)) for m in metrics),
        ]
        for p in points
    ]
    return format_table(headers, rows)
