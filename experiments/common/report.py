"""Tables (CSV + JSON), line plots and bar charts (matplotlib, Agg backend) of experiment results."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path, *, meta: Mapping[str, Any] | None = None,
                columns: Sequence[str] | None = None) -> list[Path]:
    """Writes ``rows`` as ``PATH.csv`` and ``PATH.json`` (``{"meta": ..., "rows": [...]}``).

    ``path`` is given without extension; ``columns`` (default: every key, in first-seen
    order) are the CSV's. Returns the two paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})
    with open(json_path, "w") as f:
        json.dump({"meta": dict(meta or {}), "rows": [dict(r) for r in rows]}, f, indent=1, default=_json_default)
    return [csv_path, json_path]


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def write_json(obj: Any, path: str | Path) -> Path:
    """Writes ``obj`` as indented JSON (numpy scalars and arrays as numbers and lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    return path


@dataclasses.dataclass
class Series:
    """One line of a plot; ``style`` goes to ``Axes.plot``."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: dict[str, Any] = dataclasses.field(default_factory=dict)


def _panels(path: str | Path, n: int, *, width: float, height: float, sharey: bool = False):
    """A headless figure of ``n`` side-by-side panels, and ``path`` with its folder made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), sharey=sharey, squeeze=False)
    return path, fig, axes


def _save(fig, path: Path, suptitle: str = "") -> Path:
    import matplotlib.pyplot as plt

    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(path: str | Path, panels: Sequence[tuple[str, Sequence[Series]]], *,
               xlabel: str | Sequence[str], ylabel: str | Sequence[str],
               suptitle: str = "", logy: bool = False,
               ylim: tuple[float, float] | Sequence[tuple[float, float] | None] | None = None,
               sharey: bool = True) -> Path:
    """Draws one or more side-by-side panels of lines into a PNG.

    Args:
      path: the PNG file.
      panels: ``(title, [Series, ...])`` per panel.
      xlabel, ylabel: axis labels, one for every panel or one per panel.
      suptitle: an overall title.
      logy: logarithmic y axis.
      ylim: y range of every panel, or one range (or None) per panel.
      sharey: panels share the y axis.
    """
    path, fig, axes = _panels(path, len(panels), width=5.2, height=4, sharey=sharey)
    xlabels = [xlabel] * len(panels) if isinstance(xlabel, str) else list(xlabel)
    ylabels = [ylabel] + [""] * (len(panels) - 1) if isinstance(ylabel, str) else list(ylabel)
    if ylim is None or (len(ylim) == 2 and all(isinstance(v, (int, float)) for v in ylim)):
        ylims = [ylim] * len(panels)
    else:
        ylims = list(ylim)
    for ax, (title, series), xl, yl, lim in zip(axes[0], panels, xlabels, ylabels, ylims):
        for s in series:
            ax.plot(s.x, s.y, label=s.label, **s.style)
        ax.set(title=title, xlabel=xl)
        if yl:
            ax.set_ylabel(yl)
        if logy:
            ax.set_yscale("log")
        if lim is not None:
            ax.set_ylim(*lim)
        ax.grid(alpha=0.3, which="both" if logy else "major")
        if series:
            ax.legend(fontsize=8)
    return _save(fig, path, suptitle)


def plot_bars(path: str | Path, labels: Sequence[str], panels: Sequence[tuple[str, Sequence[float]]], *,
              suptitle: str = "", value_format: str = "{:.3g}") -> Path:
    """Side-by-side bar charts into a PNG: one panel per ``(title, values)``, one bar per label.

    Each bar is annotated with its value (``value_format``); NaN values draw no bar.
    """
    path, fig, axes = _panels(path, len(panels), width=3.6, height=3.8)
    x = np.arange(len(labels))
    colours = [f"C{i}" for i in range(len(labels))]
    for ax, (title, values) in zip(axes[0], panels):
        vals = np.asarray(values, np.float64)
        ax.bar(x, np.nan_to_num(vals), color=colours)
        for xi, v in zip(x, vals):
            if np.isfinite(v):
                ax.annotate(value_format.format(v), (xi, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, suptitle)


def report_written(paths: Iterable[str | Path], print_fn: Callable[..., None] = print) -> None:
    """Prints where the outputs went, one file a line."""
    paths = [Path(p) for p in paths]
    print_fn(f"wrote {len(paths)} files:")
    for p in paths:
        print_fn(f"  {p}")
