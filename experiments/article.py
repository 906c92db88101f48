"""What the article's choices cost: its network and recipe beside the paper's, on the same data and budget.

    python experiments/article.py --quick              # 2 steps each on digits: about a minute on 2 CPU cores
    python experiments/article.py                      # 10 epochs each (CIFAR-10 if prepared, else digits)

Three runs, each with the same data, batch and number of steps:

1. ``article``: the article's network (``article_resnet``) and recipe exactly
   (``cifar10_article``: SGD lr 0.1 constant, momentum 0.9, no weight decay, batch 128,
   10 epochs, random crop after 4-pixel padding, no flips, no normalisation);
2. ``article_net_paper_recipe``: the same network with the paper's training recipe
   (He et al. 2015, section 4.2): weight decay 1e-4, flips, per-channel normalisation,
   lr divided by 10 at 50% and 75% of the steps;
3. ``resnet20_article_recipe``: the paper's CIFAR ResNet-20 (16-32-64 channels, 0.27M
   parameters) with the article's recipe.

(1) against (2) is what the recipe costs, (1) against (3) what the network costs: its
constant width of 64 and a feature map that is 8x8 after the stem and 1x1 from the fourth
block on. The table gives each run's final and best test top-1, parameters and forward
FLOPs (of the CIFAR-10 network: 10 classes, 32x32 RGB, whatever data trained it) and
training images/s. We evaluate on unaugmented test images (the article random-crops its
test set too). On the digits fallback the crop pads 2 pixels and never flips (digits are
not mirror-symmetric), so (2) differs from (1) there by weight decay, normalisation and the
schedule only.

Writes ``article.{csv,json}`` (one row per run), ``article_epochs.{csv,json}`` and
``article.png`` into ``--outdir``; runs go to ``--outdir/runs/<variant>`` and resume if
interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402

from flax import nnx  # noqa: E402

from flax_resnet import data  # noqa: E402
from flax_resnet.configs import load_config  # noqa: E402
from flax_resnet.models import count_params, create_model, forward_flops  # noqa: E402

QUICK = {"steps": 2, "batch_size": 16}
RECIPE = "cifar10_article"
# The paper's CIFAR training recipe on top of the article's (He et al. 2015, section 4.2).
PAPER_RECIPE = {"weight_decay": 1e-4, "augment_flip": True, "normalize": True, "schedule": "step"}
# name, model, trained with the paper's recipe (else the article's), description
VARIANTS = (
    ("article", "article_resnet", False, "the article's network and recipe"),
    ("article_net_paper_recipe", "article_resnet", True, "the article's network, the paper's recipe"),
    ("resnet20_article_recipe", "resnet20", False, "the paper's ResNet-20, the article's recipe"),
)
CIFAR10_SHAPE = {"num_classes": 10, "size": 32, "channels": 3}  # where params and FLOPs are counted


def parse(argv):
    p = cmdline.experiment_parser(__doc__, "article", "a few steps on digits (used by the tests)",
                                  steps_help="training steps per run (default: the recipe's 10 epochs)",
                                  batch_help="global batch (default 128)",
                                  fresh_help="delete earlier runs in --outdir/runs first")
    return cmdline.parse_experiment_args(p, argv, QUICK)


def total_steps(dataset: str, overrides: dict, user_overrides) -> int:
    """The number of steps every run takes (the recipe's epochs, or ``--steps``)."""
    config = load_config(RECIPE, [*cmdline.as_overrides(overrides), *user_overrides])
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    info = data.get_dataset_info(config.dataset, config.data_dir)
    return int(config.num_epochs) * (info.train_size // int(config.batch_size))


def network_size(model: str) -> dict:
    """Parameters and forward GFLOPs of ``model`` as a CIFAR-10 network."""
    s = CIFAR10_SHAPE
    abstract = nnx.eval_shape(lambda: create_model(model, s["num_classes"], in_channels=s["channels"]))
    return {"params": count_params(abstract), "gflops": forward_flops(model, s["size"], s["channels"]) / 1e9}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    dataset, note = runs.experiment_dataset(args)
    out = Path(args.outdir)
    common = {"dataset": dataset, **cmdline.run_overrides(args)}
    steps = total_steps(dataset, common, user_overrides)
    paper = {**PAPER_RECIPE, "lr_boundaries_steps": (round(0.5 * steps), round(0.75 * steps))}
    print(f"article: {len(VARIANTS)} runs of {steps} steps on {dataset}; machine: {runs.machine()}")

    rows, epochs = [], []
    for name, model, paper_recipe, description in VARIANTS:
        overrides = {**common, "model": model, **(paper if paper_recipe else {})}
        r = runs.run_recipe(RECIPE, out / "runs" / name, overrides, name=name, extra_overrides=user_overrides,
                            fresh=args.fresh)
        s = r.summary_row()
        c = r.config
        rows.append({"variant": name, "description": description, "model": model, "dataset": dataset,
                     "steps": s["steps"], "epochs": s["epochs"],
                     "test_top1": _top1(s["final_test_error"]), "best_test_top1": _top1(s["best_test_error"]),
                     **network_size(model), "train_images_per_sec": s.get("images_per_sec"),
                     "final_train_error": s["final_train_error"], "wall_s": s.get("wall_s"),
                     "diverged_step": s["diverged_step"],
                     "recipe": {k: c[k] for k in ("learning_rate", "schedule", "lr_boundaries_steps", "momentum",
                                                  "weight_decay", "batch_size", "augment", "augment_flip",
                                                  "normalize")}})
        epochs += [{"variant": name, **e} for e in r.epoch_rows()]

    cmd = cmdline.command_line("article.py", argv)
    meta = {"command": cmd, "machine": runs.machine(), "dataset": dataset, "note": note, "quick": args.quick,
            "params_and_flops": "of the CIFAR-10 network (10 classes, 32x32 RGB), forward pass of one image, "
                                "a multiply-add = 2 FLOPs",
            "evaluation": "unaugmented test images (the article random-crops its test set too)"}
    columns = [k for k in rows[0] if k != "recipe"]  # the CSV; the JSON keeps each run's recipe
    written = report.write_table(rows, out / "article", meta=meta, columns=columns)
    written += report.write_table(epochs, out / "article_epochs", meta={"command": cmd, "dataset": dataset})
    written.append(report.plot_bars(
        out / "article.png", [r["variant"] for r in rows],
        [("test top-1 (%)", [_nan(r["test_top1"]) for r in rows]),
         ("parameters (M)", [r["params"] / 1e6 for r in rows]),
         ("forward GFLOPs / image", [r["gflops"] for r in rows]),
         ("train images/s", [_nan(r["train_images_per_sec"]) for r in rows])],
        suptitle=f"the article's choices on {dataset}, {steps} steps each" + (" (quick mode)" if args.quick else "")))

    print(f"\n{'variant':26} {'test top-1':>10} {'params':>10} {'GFLOPs':>7} {'images/s':>9}")
    for r in rows:
        print(f"{r['variant']:26} {_nan(r['test_top1']):9.2f}% {r['params']:>10,} {r['gflops']:7.3f} "
              f"{_nan(r['train_images_per_sec']):9.1f}")
    if note:
        print(note)
    report.report_written(written)
    return {"rows": rows, "files": [str(p) for p in written], "dataset": dataset, "steps": steps}


def _top1(error: float | None) -> float | None:
    return None if error is None else 100.0 - error


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


if __name__ == "__main__":
    main()
