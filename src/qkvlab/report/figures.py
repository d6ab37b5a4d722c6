"""The one way qkvlab makes and writes a matplotlib figure (headless Agg backend, imported on first use).

Every figure goes through :func:`save`, which can check that it is readable as it is
(:func:`figure_problems`): each panel titled, both axes labelled, a legend (or a colour bar) wherever
there are several series, and a colour bar on every heatmap. With ``QKVLAB_CHECK_FIGURES=1`` in the
environment (the test suite sets it) a figure that fails the check is an error, not a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from qkvlab.files import write_atomic

__all__ = ["FigureProblem", "figure_problems", "pyplot", "save"]


class FigureProblem(AssertionError):
    """A figure that a reader could not read as it is (raised only in checking mode)."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); imported only when a figure is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_colorbar(ax: Any) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _series(ax: Any) -> int:
    """Data series drawn in ``ax``: lines with more than two points (two-point lines are reference
    lines such as ``axhline``), scatter/errorbar collections and bar containers."""
    lines = [
        ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2 or ln.get_marker() not in (None, "None", "")
    ]
    collections = [c for c in ax.collections if len(getattr(c, "get_offsets", list)()) > 0]
    return len(lines) + len(collections) + len(ax.containers)


def _label(ax: Any, axis: str) -> bool:
    """Whether the x or y axis of ``ax`` is labelled, here or on a panel it shares the axis with."""
    get = (lambda a: a.get_xlabel()) if axis == "x" else (lambda a: a.get_ylabel())
    shared = ax.get_shared_x_axes() if axis == "x" else ax.get_shared_y_axes()
    return any(get(a).strip() for a in shared.get_siblings(ax))


def figure_problems(fig: Any) -> list[str]:
    """What a reader would miss in ``fig``; [] when it is readable as it is."""
    problems = []
    suptitle = fig._suptitle.get_text().strip() if fig._suptitle is not None else ""
    images = [
        im
        for ax in fig.axes
        for im in (
            *ax.images,
            *[c for c in ax.collections if c.get_array() is not None and c.__class__.__name__ == "QuadMesh"],
        )
    ]
    coloured = {id(im.norm) for im in images if im.colorbar is not None}
    has_colorbar = any(_is_colorbar(ax) for ax in fig.axes)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    legend_labels = {t.get_text() for legend in legends for t in legend.get_texts()}
    panels = [ax for ax in fig.axes if ax.axison and not _is_colorbar(ax) and (ax.has_data() or ax.images)]
    for i, ax in enumerate(panels):
        name = ax.get_title() or f"panel {i}"
        if not (
            ax.get_title().strip() or ax.get_title(loc="left").strip() or (suptitle and len(panels) == 1)
        ):
            problems.append(f"{name}: no title")
        if not _label(ax, "x"):
            problems.append(f"{name}: x axis not labelled")
        if not _label(ax, "y"):
            problems.append(f"{name}: y axis not labelled")
        for im in ax.images:
            if id(im.norm) not in coloured:
                problems.append(f"{name}: heatmap without a colour bar")
        if _series(ax) > 1 and ax.get_legend() is None and not has_colorbar:
            # A legend in another panel covers this one when it names every series labelled here.
            labels = {label for label in ax.get_legend_handles_labels()[1]}
            if not labels or not labels <= legend_labels:
                problems.append(f"{name}: {_series(ax)} series and no legend")
    if not panels:
        problems.append("figure has no panel with data")
    return problems


def save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, (check,) write and close ``fig``; returns ``path``."""
    if os.environ.get("QKVLAB_CHECK_FIGURES") == "1":
        problems = figure_problems(fig)
        if problems:
            pyplot().close(fig)
            raise FigureProblem(f"{Path(path).name}: " + "; ".join(problems))
    if fig.get_layout_engine() is None:  # figures laid out by "constrained" keep their engine
        fig.tight_layout()
    buffer = io.BytesIO()  # rendered in memory, then written atomically and never through a link
    fig.savefig(buffer, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    pyplot().close(fig)
    write_atomic(path, buffer.getvalue())
    return path
