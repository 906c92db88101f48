"""CIFAR-10 ResNet-20/32/44/56/110 with the paper's recipe, measured beside the paper's test errors.

    python experiments/cifar10.py --quick              # ResNet-20, 5 steps on digits: ~10 s on 2 CPU cores
    python experiments/cifar10.py                      # all five depths, 64k iterations each (a GPU job)
    python experiments/cifar10.py --depths 20 56 --config.half_precision=true

The recipe is He et al. 2015, section 4.2 (``cifar10_resnet20``; ``cifar10_resnet56`` /
``cifar10_resnet110`` where they exist, ResNet-110 with its warm-up): batch 128, SGD lr 0.1,
momentum 0.9, weight decay 1e-4, lr / 10 at 32k and 48k iterations, 64k in all, 4-pixel
pad + random crop + flip, option-A shortcuts. The paper's test errors (Table 6: 8.75 /
7.51 / 7.17 / 6.97 / 6.43 %) are printed beside the measured ones; a measured number is
marked ``comparable`` only when it comes from real CIFAR-10 and the full 64k-step schedule.
Without a prepared CIFAR-10 the script says so and trains the same depths on the embedded
digits with the digits recipe instead (not comparable).

Writes ``cifar10.{csv,json}`` (one row per depth), ``cifar10_epochs.{csv,json}`` and
``cifar10.png`` (test error against depth, paper and measured; test-error curves) into
``--outdir``; runs go to ``--outdir/runs/<model>`` and resume if interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402
from common.references import PAPER_CIFAR10_TEST_ERROR  # noqa: E402

from flax_resnet.configs import get_config, list_configs  # noqa: E402

# The run of degradation's quick ResNet-20 (recipe, batch, steps): its compiled programs come from the cache.
QUICK = {"depths": [20], "steps": 5, "batch_size": 16}


def parse(argv):
    p = cmdline.experiment_parser(__doc__, "cifar10", "ResNet-20, a few steps on digits (used by the tests)",
                                  steps_help="training steps per network (default: the recipe's)",
                                  fresh_help="delete earlier runs in --outdir/runs first")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="default 20 32 44 56 110")
    return cmdline.parse_experiment_args(p, argv, QUICK, {"depths": [20, 32, 44, 56, 110]})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    dataset, note = runs.experiment_dataset(args)
    out = Path(args.outdir)
    print(f"cifar10: depths {args.depths} on {dataset}; machine: {runs.machine()}")

    rows, epochs, results = [], [], {}
    for depth in args.depths:
        model = f"resnet{depth}"
        own = f"cifar10_{model}"
        if dataset == "cifar10":
            recipe = own if own in list_configs() else "cifar10_resnet20"
        else:
            recipe = runs.recipe_for(dataset)
        overrides = {"model": model, "dataset": dataset, **cmdline.run_overrides(args)}
        r = runs.run_recipe(recipe, out / "runs" / model, overrides, extra_overrides=user_overrides, fresh=args.fresh)
        results[model] = r
        full_steps = get_config(recipe).num_train_steps
        row = {**r.summary_row(), "depth": depth, "recipe": recipe,
               "paper_test_error": PAPER_CIFAR10_TEST_ERROR.get(model)}
        row["comparable"] = dataset == "cifar10" and full_steps > 0 and row["steps"] >= full_steps
        rows.append(row)
        epochs += r.epoch_rows()

    cmd = cmdline.command_line("cifar10.py", argv)
    meta = {"command": cmd, "machine": runs.machine(), "dataset": dataset, "note": note, "quick": args.quick,
            "user_overrides": user_overrides,
            "paper": "He et al. 2015, Table 6 (CIFAR-10 test error %; ResNet-110: best of 5 runs, mean 6.61)"}
    written = report.write_table(rows, out / "cifar10", meta=meta,
                                 columns=["model", "depth", "paper_test_error", "final_test_error", "best_test_error",
                                          "comparable", "dataset", "recipe", "steps", "epochs", "final_train_error",
                                          "compile_s", "wall_s", "images_per_sec"])
    written += report.write_table(epochs, out / "cifar10_epochs", meta={"command": cmd})

    depths = [r["depth"] for r in rows]
    published = [d for d in depths if f"resnet{d}" in PAPER_CIFAR10_TEST_ERROR]
    by_depth = report.Series("paper (He et al. 2015)", published,
                             [PAPER_CIFAR10_TEST_ERROR[f"resnet{d}"] for d in published],
                             {"marker": "s", "color": "black"})
    comparable = "" if all(r["comparable"] for r in rows) else ", not comparable"
    measured = report.Series(f"measured ({dataset}{comparable})", depths, [r["final_test_error"] for r in rows],
                             {"marker": "o", "color": "tab:blue"})
    curves = []
    for model, r in results.items():
        xs, ys = r.test_error_curve()
        curves.append(report.Series(model, xs, ys, {"marker": "o", "ms": 3}))
    written.append(report.plot_lines(out / "cifar10.png", [("final test error vs depth", [by_depth, measured]),
                                                           ("test error during training", curves)],
                                     xlabel=["depth", "iteration"], ylabel="test error (%)", sharey=False,
                                     suptitle=f"CIFAR-10 recipe on {dataset}"
                                              + (" (quick mode)" if args.quick else "")))

    print(f"\n{'model':10s} {'paper err %':>11s} {'measured err %':>15s} {'best err %':>11s} {'steps':>7s}  comparable")
    for r in rows:
        paper = f"{r['paper_test_error']:.2f}" if r["paper_test_error"] is not None else "-"
        print(f"{r['model']:10s} {paper:>11s} {r['final_test_error']:15.2f} {r['best_test_error']:11.2f} "
              f"{r['steps']:7d}  {'yes' if r['comparable'] else 'no'}")
    if not all(r["comparable"] for r in rows):
        print("measured numbers marked 'no' are not comparable to the paper's (other data or a shortened schedule)")
    report.report_written(written)
    return {"rows": rows, "files": [str(p) for p in written], "dataset": dataset}


if __name__ == "__main__":
    main()
