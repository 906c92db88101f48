"""Degradation: plain vs residual networks at depths 20 and 56 (He et al. 2015, Figure 6).

    python experiments/degradation.py --quick          # digits, 12 steps per network: ~1 min on 2 CPU cores
    python experiments/degradation.py                  # the dataset's full recipe (CIFAR-10 if prepared)

Trains plain-20, plain-56, ResNet-20 and ResNet-56 with the same recipe (CIFAR-10's
``cifar10_resnet20``, 64k iterations, when CIFAR-10 is prepared; else the embedded digits
with ``digits_resnet20``, 10 epochs, and a printed note) through ``train_and_evaluate``,
and plots training error (thin: per log interval, on augmented batches in train mode) and
test error (bold: per epoch) against iterations, plain nets left, ResNets right, as the
paper's Figure 6. The paper's claim: plain-56 has *higher* training error than plain-20
(degradation), ResNet-56 *lower* than ResNet-20. Quick mode (a dozen steps) shows only
the first steps, too few to tell the networks apart (its verdicts are noise); the printed
verdicts of a full run say what it shows, whichever way it goes.

Writes ``degradation.{csv,json}`` (one row per network), ``degradation_curves.{csv,json}``
and ``degradation.png`` into ``--outdir``; the runs themselves (metrics.jsonl, checkpoints,
curves.png) go to ``--outdir/runs/<model>`` and resume if interrupted (``--fresh`` restarts).
Any ``--config.FIELD=VALUE`` is passed to every run.
"""

from __future__ import annotations

import sys

QUICK = {"steps": 12, "batch_size": 16, "log_every": 2}


def parse(argv):
    from flax_resnet.experiments import experiment_parser, parse_experiment_args

    p = experiment_parser(__doc__, "degradation", "a few steps per network on digits (used by the tests)",
                          steps_help="training steps per network (default: the recipe's)",
                          fresh_help="delete earlier runs in --outdir/runs first")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="depths (6n+2) to compare")
    p.add_argument("--log-every", type=int, default=None, help="steps per training-error point")
    return parse_experiment_args(p, argv, QUICK)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    from pathlib import Path

    from flax_resnet import experiments as ex

    dataset, note = ex.experiment_dataset(args)
    recipe = ex.recipe_for(dataset)
    overrides = {"dataset": dataset, **ex.run_overrides(args, log_every_steps="log_every")}
    out = Path(args.outdir)
    print(f"degradation: recipe {recipe} on {dataset}, depths {args.depths}; machine: {ex.machine()}")

    results = {}
    for kind in ("plain", "resnet"):
        for depth in args.depths:
            model = f"{kind}{depth}"
            results[model] = ex.run_recipe(recipe, out / "runs" / model, {**overrides, "model": model},
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
    cmd = ex.command_line("degradation.py", argv)
    meta = {"command": cmd, "machine": ex.machine(), "dataset": dataset, "recipe": recipe, "note": note,
            "quick": args.quick, "overrides": {**overrides, "user": user_overrides}, "verdicts": verdicts,
            "train_error": "100 x (1 - top-1) on augmented training batches, BatchNorm in train mode; "
                           "final_train_error is the mean over the last 25% of logged intervals"}
    written = ex.write_table(rows, out / "degradation", meta=meta)
    written += ex.write_table(curves, out / "degradation_curves", meta={"command": cmd})

    panels = []
    for kind, title in (("plain", "plain networks"), ("resnet", "ResNets")):
        series = []
        for depth, color in zip(args.depths, ("tab:orange", "tab:red", "tab:purple", "tab:brown")):
            r = results[f"{kind}{depth}"]
            label = f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}"
            series.append(ex.Series(f"{label} train", *r.training_error_curve(), {"color": color, "lw": 0.9}))
            xs, ys = r.test_error_curve()
            series.append(ex.Series(f"{label} test", xs, ys, {"color": color, "lw": 2.2, "marker": "o", "ms": 3}))
        panels.append((title, series))
    written.append(ex.plot_lines(out / "degradation.png", panels, xlabel="iteration", ylabel="error (%)",
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
        print("quick mode: a dozen steps are too few to tell these networks apart (the verdicts above are noise); "
              "run without --quick for the effect")
    ex.report_written(written)
    return {"rows": rows, "verdicts": verdicts, "files": [str(p) for p in written], "dataset": dataset}


if __name__ == "__main__":
    main()
