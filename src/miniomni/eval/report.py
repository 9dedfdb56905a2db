"""Reports: one JSON file, a Markdown summary table and (optionally) a PNG of distributions."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "plot_histograms", "report_paths", "write_report"]


def report_paths(out: str | Path) -> dict[str, Path]:
    """``out`` (``report`` or ``report.json``) -> ``report.json``, ``report.md``, ``report.png``."""
    out = Path(out)
    if out.suffix.lower() in (".json", ".md", ".png"):
        out = out.with_suffix("")
    return {kind: out.with_name(out.name + "." + kind) for kind in ("json", "md", "png")}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[tuple[str, Any]], header: tuple[str, str] = ("metric", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | ---: |"]
    lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def plot_histograms(path: str | Path, panels: Sequence[tuple[str, Sequence[float]]], title: str = "") -> Path | None:
    """One histogram per (label, values) panel, side by side, via matplotlib's Agg backend.

    Returns None (and writes nothing) when matplotlib is missing or no panel has a value.
    """
    panels = [(label, [float(v) for v in values if v is not None and math.isfinite(float(v))])
              for label, values in panels]
    panels = [(label, values) for label, values in panels if values]
    if not panels:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(4 * len(panels), 3.2), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas, without touching pyplot's global backend
    for index, (label, values) in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), index)
        axes.hist(values, bins=min(30, max(5, len(values))), color="#4472c4", edgecolor="white")
        axes.set_xlabel(label)
        axes.set_ylabel("rows")
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def write_report(out: str | Path, report: dict, markdown: str,
                 panels: Sequence[tuple[str, Sequence[float]]] = (), title: str = "") -> dict[str, str]:
    """Write JSON + Markdown (+ PNG when there is something to plot); returns the paths written."""
    paths = report_paths(out)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    written = {}
    png = plot_histograms(paths["png"], panels, title) if panels else None
    if png is not None:
        written["png"] = str(png)
        markdown += f"\n![distributions]({png.name})\n"
    report = {**report, "files": {**written, "json": str(paths["json"]), "md": str(paths["md"])}}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown, encoding="utf-8")
    return {"json": str(paths["json"]), "md": str(paths["md"]), **written}
