"""The article's training setup: its network, SGD lr 0.1, momentum 0.9, batch 128, 10 epochs.

    python experiments/article.py --quick              # 2 steps on digits: ~20 s on 2 CPU cores
    python experiments/article.py                      # the full setup (CIFAR-10 if prepared, else digits)

Trains ``article_resnet`` (the article's network, fixed: 7x7/2 stem, four residual blocks
of 64..512 channels with max-pools between them, one classifier) with the
``cifar10_article`` recipe: SGD lr 0.1 (constant), momentum 0.9, no weight decay, batch 128,
10 epochs, random crop after 4-pixel padding. Differences from the article, stated
rather than hidden: the CIFAR-10 pipeline also flips images horizontally, and on the
digits fallback the crop pads 2 pixels (8x8 digits brought to 32x32) and never flips.

Writes ``article.{csv,json}`` (one row per epoch: train loss/error, test loss/error),
``article_summary.json`` and ``article.png`` into ``--outdir``; the run goes to
``--outdir/run`` and resumes if interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402

QUICK = {"steps": 2, "batch_size": 16}


def parse(argv):
    p = cmdline.experiment_parser(__doc__, "article", "a few steps on digits (used by the tests)",
                                  steps_help="training steps (default: the recipe's 10 epochs)",
                                  batch_help="global batch (default 128)",
                                  fresh_help="delete an earlier run in --outdir/run first")
    return cmdline.parse_experiment_args(p, argv, QUICK)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    dataset, note = runs.experiment_dataset(args)
    out = Path(args.outdir)
    overrides = {"dataset": dataset, **cmdline.run_overrides(args)}
    print(f"article: cifar10_article recipe on {dataset}; machine: {runs.machine()}")
    r = runs.run_recipe("cifar10_article", out / "run", overrides, extra_overrides=user_overrides, fresh=args.fresh)

    cmd = cmdline.command_line("article.py", argv)
    summary = {**r.summary_row(), "command": cmd, "machine": runs.machine(), "note": note, "quick": args.quick,
               "setup": {k: r.config[k] for k in ("model", "batch_size", "learning_rate", "momentum", "weight_decay",
                                                  "schedule", "num_epochs", "num_train_steps", "augment")},
               "deviations": "CIFAR-10: horizontal flips on top of the article's RandomCrop(32, padding=4); "
               "digits: 2-pixel padding, no flips"}
    written = report.write_table(r.epoch_rows(), out / "article", meta={"command": cmd, "machine": runs.machine(),
                                                                        "dataset": dataset, "note": note})
    written.append(report.write_json(summary, out / "article_summary.json"))
    (ts, tr), (es, te) = r.training_error_curve(), r.test_error_curve()
    written.append(report.plot_lines(
        out / "article.png",
        [("article_resnet", [report.Series("train error (per log interval)", ts, tr, {"lw": 0.9}),
                             report.Series("test error (per epoch)", es, te, {"lw": 2, "marker": "o", "ms": 4})])],
        xlabel="iteration", ylabel="error (%)", ylim=(0, 100),
        suptitle=f"the article's setup on {dataset}" + (" (quick mode)" if args.quick else "")))

    print(f"\narticle_resnet on {dataset}: final test error {summary['final_test_error']:.2f}% "
          f"(top-1 {100 - summary['final_test_error']:.2f}%), best {summary['best_test_error']:.2f}% at epoch "
          f"{summary['best_epoch']}, {summary['steps']} steps in {summary['wall_s']:.0f}s")
    report.report_written(written)
    return {"summary": summary, "files": [str(p) for p in written], "dataset": dataset}


if __name__ == "__main__":
    main()
