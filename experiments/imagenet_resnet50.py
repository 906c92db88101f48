"""ResNet-50 on ImageNet with the ``imagenet_resnet50`` recipe, beside the reference top-1 numbers.

    python experiments/imagenet_resnet50.py --quick    # the recipe checked without data or training: ~10 s
    python experiments/imagenet_resnet50.py --data-dir DIR                        # the real run (8 GPUs: about a day)
    python experiments/imagenet_resnet50.py --data-dir DIR --config.batch_size=512
    python experiments/imagenet_resnet50.py --dataset digits --steps 2 --batch-size 16   # a CPU smoke run

A thin wrapper over the recipe (Flax's ImageNet example setup: ResNet-50 v1.5, global
batch 1024, lr 0.1 x batch/256, Nesterov momentum 0.9, weight decay 1e-4, 5-epoch warm-up
then cosine, 100 epochs, bfloat16 compute). Reference top-1 on the ImageNet validation set:
Flax's example reaches 76.5 % in 100 epochs; torchvision's ResNet-50 V1 weights score
76.13 %. ImageNet must be prepared (``flax-resnet prepare imagenet2012 --data_dir DIR``
with the manually downloaded archives); there is no fallback dataset.

``--quick`` trains nothing (a ResNet-50 step costs about a minute of compilation on a
CPU): it builds the model abstractly, checks its parameter count against torchvision's
25,557,032, and evaluates the recipe's schedule for ImageNet's 1,281,167 training images.

Writes ``imagenet_resnet50.{csv,json}`` (references, the recipe's plan and, after
training, measured top-1) and ``imagenet_resnet50.png`` (learning rate and, after
training, test top-1 per epoch beside the references) into ``--outdir``; the run goes
to ``--outdir/run`` and resumes if interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402
from common.references import (IMAGENET_TRAIN_IMAGES, REFERENCE_IMAGENET_RESNET50,  # noqa: E402
                               TORCHVISION_RESNET50_PARAMS)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="check the recipe without data or training (used by the tests)")
    p.add_argument("--outdir", default=None, help="output directory (default runs/experiments/imagenet_resnet50[_quick])")
    p.add_argument("--dataset", default="imagenet2012", help="dataset (default imagenet2012)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory holding the prepared imagenet2012")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's 100 epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 1024)")
    p.add_argument("--fresh", action="store_true", help="delete an earlier run in --outdir/run first")
    args, overrides = cmdline.split_overrides(p, argv)
    args.outdir = args.outdir or f"runs/experiments/imagenet_resnet50{'_quick' if args.quick else ''}"
    return args, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    out = Path(args.outdir)
    refs = REFERENCE_IMAGENET_RESNET50
    overrides = {}
    for key, value in (("num_train_steps", args.steps), ("batch_size", args.batch_size), ("data_dir", args.data_dir)):
        if value is not None:
            overrides[key] = value
    print(f"imagenet_resnet50 recipe; references: Flax example {refs['flax_imagenet_example']['top1']}% top-1 in "
          f"100 epochs, torchvision V1 weights {refs['torchvision_v1_weights']['top1']}%; machine: {runs.machine()}")
    plan = runs.recipe_plan("imagenet_resnet50", IMAGENET_TRAIN_IMAGES, num_classes=1000,
                            overrides=[*cmdline.as_overrides(overrides), *user_overrides])
    print(f"recipe plan on ImageNet: {plan['model']} ({plan['params']:,} params; torchvision "
          f"{TORCHVISION_RESNET50_PARAMS:,}), batch {plan['batch_size']}, {plan['steps_per_epoch']} steps/epoch, "
          f"{plan['total_steps']} steps ({plan['epochs']:.0f} epochs), peak lr {plan['peak_lr']:.3g}")
    rows = [{"what": "Flax ImageNet example (reference)", "top1": refs["flax_imagenet_example"]["top1"],
             "epochs": refs["flax_imagenet_example"]["epochs"], "source": refs["flax_imagenet_example"]["source"]},
            {"what": "torchvision ResNet50 V1 weights (reference)", "top1": refs["torchvision_v1_weights"]["top1"],
             "source": refs["torchvision_v1_weights"]["source"]},
            {"what": "imagenet_resnet50 recipe (plan)", "params": plan["params"],
             "params_match_torchvision": plan["params"] == TORCHVISION_RESNET50_PARAMS,
             "epochs": round(plan["epochs"], 2), "steps": plan["total_steps"], "peak_lr": plan["peak_lr"]}]
    epochs = []
    dataset = None
    if not args.quick:
        dataset, _ = runs.choose_dataset(args.dataset, data_dir=args.data_dir)  # fails with the prepare command
        r = runs.run_recipe("imagenet_resnet50", out / "run", {**overrides, "dataset": dataset},
                            extra_overrides=user_overrides, fresh=args.fresh)
        s = r.summary_row()
        epochs = r.epoch_rows()
        rows.append({"what": f"measured on {dataset}", "top1": 100 - s["final_test_error"],
                     "best_top1": 100 - s["best_test_error"], "epochs": s["epochs"], "steps": s["steps"],
                     "comparable": dataset.startswith("imagenet2012") and s["steps"] >= plan["total_steps"],
                     "wall_s": s["wall_s"], "compile_s": s["compile_s"], "images_per_sec": s["images_per_sec"]})

    cmd = cmdline.command_line("imagenet_resnet50.py", argv)
    meta = {"command": cmd, "machine": runs.machine(), "dataset": dataset, "quick": args.quick,
            "user_overrides": user_overrides, "schedule": plan["schedule"]}
    written = report.write_table(rows, out / "imagenet_resnet50", meta=meta,
                                 columns=["what", "top1", "best_top1", "epochs", "steps", "comparable", "params",
                                          "params_match_torchvision", "peak_lr", "wall_s", "compile_s",
                                          "images_per_sec", "source"])
    sched = plan["schedule"]
    lr_panel = ("learning rate (recipe)", [report.Series("lr", [e for e, _ in sched], [lr for _, lr in sched])])
    top1 = [report.Series(f"Flax example ({refs['flax_imagenet_example']['top1']}%)", [0, 100],
                          [refs["flax_imagenet_example"]["top1"]] * 2, {"ls": "--", "color": "black"}),
            report.Series(f"torchvision V1 weights ({refs['torchvision_v1_weights']['top1']}%)", [0, 100],
                          [refs["torchvision_v1_weights"]["top1"]] * 2, {"ls": ":", "color": "gray"})]
    if epochs:
        top1.insert(0, report.Series(f"measured ({dataset})", [e["epoch"] for e in epochs],
                                     [100 - e["test_error"] for e in epochs], {"marker": "o"}))
    written.append(report.plot_lines(out / "imagenet_resnet50.png", [lr_panel, ("test top-1 (%)", top1)],
                                     xlabel="epoch", ylabel=["learning rate", "top-1 (%)"], sharey=False,
                                     ylim=[None, (0, 100)],
                                     suptitle="imagenet_resnet50 recipe"
                                              + (" (quick: plan only)" if args.quick else "")))

    print(f"\n{'':48s} {'top-1 %':>8s}")
    for row in rows:
        if "top1" in row:
            print(f"{row['what']:48s} {row['top1']:8.2f}" + ("" if row.get("comparable", True) else "  (not comparable)"))
    if args.quick:
        print("quick mode: nothing trained; prepare ImageNet and run without --quick to measure")
    report.report_written(written)
    return {"rows": rows, "plan": plan, "files": [str(p) for p in written]}


if __name__ == "__main__":
    main()
