"""What a sweep leaves for a person: the trials table, Optuna's plots, and the best trial's recipe.

In the sweep's workdir: ``trials.csv`` and ``trials.md`` (one row per trial: parameters, best
test top-1, state, epochs, wall time, a note such as ``pruned at epoch 2`` or ``retry of 4``),
``history.png`` (optimisation history) and ``importance.png`` (parameter importances, from two
complete trials on), and ``best_config.py`` (:mod:`flax_resnet.sweep.best_config`). Every worker
rewrites them when it stops, each file replaced atomically, so the last one to stop leaves the
complete picture.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path
from typing import Callable

from flax_resnet.sweep.best_config import FILE as BEST_CONFIG_FILE
from flax_resnet.sweep.best_config import write_best_config
from flax_resnet.sweep.space import apply_params

TABLE_CSV, TABLE_MD = "trials.csv", "trials.md"
HISTORY_PNG, IMPORTANCE_PNG = "history.png", "importance.png"


def _best_top1(t) -> float | None:
    """A trial's best test top-1: its value, or for a pruned/failed one its best reported epoch."""
    if t.value is not None:
        return float(t.value)
    reported = [v for v in t.intermediate_values.values() if v is not None]
    return max(reported) if reported else None


def _note(t) -> str:
    """The trial's note; a queued retry carries its predecessor's, so it says what it is instead."""
    history = t.system_attrs.get("retry_history")
    if t.state.name == "WAITING" and history:
        return f"queued: retry of {history[-1]}"
    return t.user_attrs.get("note", "")


def trial_rows(study) -> list[dict]:
    """One dict per trial in number order: number, state, best_top1, params, epochs, wall_s, note, workdir."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        rows.append({"number": t.number, "state": t.state.name, "best_top1": _best_top1(t), "params": dict(t.params),
                     "epochs": len(t.intermediate_values), "wall_s": wall, "note": _note(t),
                     "workdir": t.user_attrs.get("workdir", "")})
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _columns(rows: list[dict]) -> list[str]:
    fields = []
    for r in rows:
        fields += [f for f in r["params"] if f not in fields]
    return fields


def format_table(rows: list[dict]) -> str:
    """The trials as a Markdown table (what ``trials.md`` holds and the CLI prints)."""
    fields = _columns(rows)
    head = ["trial", "state", "best top-1 %", *fields, "epochs", "wall s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        top1 = "" if r["best_top1"] is None else f"{100 * r['best_top1']:.2f}"
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        cells = [str(r["number"]), r["state"], top1, *(_fmt(r["params"].get(f)) for f in fields),
                 str(r["epochs"]), wall, r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    fields = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "state", "best_top1", *fields, "epochs", "wall_s", "note", "workdir"])
    for r in rows:
        writer.writerow([r["number"], r["state"], r["best_top1"], *(r["params"].get(f) for f in fields), r["epochs"],
                         r["wall_s"], r["note"], r["workdir"]])
    return out.getvalue()


def trial_line(t) -> str:
    """One line on a trial that just ended, for the sweep's progress output."""
    top1 = _best_top1(t)
    what = f"best test top-1 {100 * top1:.2f}%" if top1 is not None else "no epoch evaluated"
    wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    note = _note(t)
    return (f"trial {t.number}: {t.state.name}, {what} after {len(t.intermediate_values)} epoch(s)"
            + (f" in {wall:.1f} s" if wall is not None else "") + (f" ({note})" if note else ""))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _save_figure(ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = ax.figure
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_plots(study, workdir: Path, n_complete: int, say: Callable[[str], None]) -> list[Path]:
    """``history.png`` (from one complete trial) and ``importance.png`` (from two); skips say why."""
    if n_complete < 1:
        say("no plots: no trial has completed yet")
        return []
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        ax = plots.plot_optimization_history(study, target_name="best test top-1")
        _save_figure(ax, workdir / HISTORY_PNG)
        out.append(workdir / HISTORY_PNG)
        if n_complete < 2:
            say("no importance plot: it needs two complete trials")
            return out
        try:
            ax = plots.plot_param_importances(study, target_name="best test top-1")
        except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. every trial drew the same values
            say(f"no importance plot: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return out
        _save_figure(ax, workdir / IMPORTANCE_PNG)
        out.append(workdir / IMPORTANCE_PNG)
    return out


def write_report(study, rows: list[dict], workdir: Path, *, n_trials: int, base_config: str | None, config,
                 say: Callable[[str], None] = print) -> tuple[str, list[str]]:
    """Writes the table, the plots and ``best_config.py``; returns the Markdown table and the files written."""
    workdir = Path(workdir)
    table = format_table(rows)
    _write(workdir / TABLE_MD, f"# Study {study.study_name}: {n_trials} trials wanted\n\n{table}\n")
    _write(workdir / TABLE_CSV, format_csv(rows))
    files = [workdir / TABLE_CSV, workdir / TABLE_MD]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    files += write_plots(study, workdir, len(complete), say)
    if complete:
        best = study.best_trial
        epochs = len(best.intermediate_values)
        files.append(write_best_config(
            workdir / BEST_CONFIG_FILE, base_config, apply_params(config, dict(best.params)), dict(best.params),
            title=f"Best trial of sweep study {study.study_name!r}: trial {best.number}, best test top-1 "
                  f"{100 * best.value:.2f}%.",
            expect=f"about {100 * best.value:.2f}% best test top-1 over {epochs} epoch(s): our sweep's trial "
                   f"{best.number}, run in {best.user_attrs.get('workdir', '?')} (same seed, same data order)."))
    return table, [str(f) for f in files]
