"""Degradation: plain vs residual networks at depths 20 and 56 (He et al. 2015, Figure 6).

    python experiments/degradation.py --quick          # depth 20, 80 steps per network on digits: ~30 s on 2 CPU cores
    python experiments/degradation.py                  # the dataset's full recipe (CIFAR-10 if prepared)

Trains plain-20, plain-56, ResNet-20 and ResNet-56 with the same recipe (CIFAR-10's
``cifar10_resnet20``, 64k iterations, when CIFAR-10 is prepared; else the embedded digits
with ``digits_resnet20``, 10 epochs, and a printed note) through ``train_and_evaluate``,
and plots training error (thin: per log interval, on augmented batches in train mode) and
test error (bold: per epoch) against iterations, plain nets left, ResNets right, as the
paper's Figure 6. The paper's claim: plain-56 has *higher* training error than plain-20
(degradation), ResNet-56 *lower* than ResNet-20; the printed verdicts of a full run say what it
shows, whichever way it goes. Quick mode (plain-20 and ResNet-20, 80 steps of batch 16) checks
the script end to end and shows one effect that holds from the start: ResNet-20's training
error is below plain-20's after 80 steps on every seed we tried (7 of 7, BUILD_NOTES.md);
deeper pairs need longer runs to order reliably.

Writes ``degradation.{csv,json}`` (one row per network), ``degradation_curves.{csv,json}``
and ``degradation.png`` into ``--outdir``; the runs themselves (metrics.jsonl, checkpoints,
curves.png) go to ``--outdir/runs/<model>`` and resume if interrupted (``--fresh`` restarts).
Any ``--config.FIELD=VALUE`` is passed to every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402

QUICK = {"depths": [20], "steps": 80, "batch_size": 16, "log_every": 4}


def parse(argv):
    p = cmdline.experiment_parser(__doc__, "degradation", "a few steps per network on digits (used by the tests)",
                                  steps_help="training steps per network (default: the recipe's)",
                                  fresh_help="delete earlier runs in --outdir/runs first")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="depths (6n+2) to compare, default 20 56")
    p.add_argument("--log-every", type=int, default=None, help="steps per training-error point")
    return cmdline.parse_experiment_args(p, argv, QUICK, {"depths": [20, 56]})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    dataset, note = runs.experiment_dataset(args)
    recipe = runs.recipe_for(dataset)
    overrides = {"dataset": dataset, **cmdline.run_overrides(args, log_every_steps="log_every")}
    out = Path(args.outdir)
    print(f"degradation: recipe {recipe} on {dataset}, depths {args.depths}; machine: {runs.machine()}")

    results = {}
    for kind in ("plain", "resnet"):
        for depth in args.depths:
            model = f"{kind}{depth}"
            results[model] = runs.run_recipe(recipe, out / "runs" / model, {**overrides, "model": model},
                                             extra_overrides=user_overrides, fresh=args.fresh)

    rows, curves = [], []
    for model, r in results.items():
        kind, depth = ("plain", model[5:]) if model.startswith("plain") else ("residual", model[6:])
        rows.append({**r.summary_row(), "kind": kind, "depth": int(depth)})
        for step, err in zip(*r.training_error_curve()):
            curves.append({"model": model, "step": int(step), "train_error": float(err)})

    err = {r["model"]: r["final_train_error"] for r in rows}
    lo, hi = min(args.depths), max(args.depths)
    verdicts = {f"resnet{d}_trains_better_than_plain{d}": bool(err[f"resnet{d}"] < err[f"plain{d}"])
                for d in args.depths}
    if lo != hi:
        verdicts[f"plain{hi}_trains_worse_than_plain{lo}"] = bool(err[f"plain{hi}"] > err[f"plain{lo}"])
        verdicts[f"resnet{hi}_trains_better_than_resnet{lo}"] = bool(err[f"resnet{hi}"] < err[f"resnet{lo}"])
    cmd = cmdline.command_line("degradation.py", argv)
    meta = {"command": cmd, "machine": runs.machine(), "dataset": dataset, "recipe": recipe, "note": note,
            "quick": args.quick, "overrides": {**overrides, "user": user_overrides}, "verdicts": verdicts,
            "train_error": "100 x (1 - top-1) on augmented training batches, BatchNorm in train mode; "
            "final_train_error is the mean over the last 25% of logged intervals"}
    written = report.write_table(rows, out / "degradation", meta=meta)
    written += report.write_table(curves, out / "degradation_curves", meta={"command": cmd})

    panels = []
    for kind, title in (("plain", "plain networks"), ("resnet", "ResNets")):
        series = []
        for depth, color in zip(args.depths, ("tab:orange", "tab:red", "tab:purple", "tab:brown")):
            r = results[f"{kind}{depth}"]
            label = f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}"
            series.append(report.Series(f"{label} train", *r.training_error_curve(), {"color": color, "lw": 0.9}))
            xs, ys = r.test_error_curve()
            series.append(report.Series(f"{label} test", xs, ys, {"color": color, "lw": 2.2, "marker": "o", "ms": 3}))
        panels.append((title, series))
    written.append(report.plot_lines(out / "degradation.png", panels, xlabel="iteration", ylabel="error (%)",
                                     suptitle=f"{dataset}: thin = training error, bold = test error"
                                              + (" (quick mode)" if args.quick else ""),
                                     ylim=(0, 100)))

    print(f"\n{'model':10s} {'final train err %':>18s} {'final test err %':>17s} {'best test err %':>16s} {'steps':>6s}")
    for r in rows:
        print(f"{r['model']:10s} {r['final_train_error']:18.2f} {r['final_test_error']:17.2f} "
              f"{r['best_test_error']:16.2f} {r['steps']:6d}")
    for k, v in verdicts.items():
        print(f"{k}: {'yes' if v else 'NO'}")
    if args.quick:
        print("quick mode: 80 steps show the residual net ahead at depth 20; run without --quick for the "
              "paper's depth comparison")
    report.report_written(written)
    return {"rows": rows, "verdicts": verdicts, "files": [str(p) for p in written], "dataset": dataset}


if __name__ == "__main__":
    main()
