"""Fine-tune pretrained ResNet weights on a folder of images: ``flax-resnet finetune``, tabulated and plotted.

    python experiments/finetune.py --quick             # random "pretrained" resnet8 on 3 synthetic classes: ~10 s
    python experiments/finetune.py --pretrained resnet50.safetensors --dataset folder:PATH
    python experiments/finetune.py --pretrained resnet50.safetensors --dataset folder:PATH --freeze-backbone

A thin wrapper: it runs ``flax-resnet finetune --pretrained FILE --model MODEL --dataset
folder:PATH --workdir OUTDIR/run`` (the ``finetune_folder`` recipe: a new head, SGD with
Nesterov momentum, cosine from lr 0.01 with the backbone at 0.1x, label smoothing 0.1,
224x224 crops, 10 epochs) and passes every other flag (``--freeze-backbone``,
``--unfreeze-epochs 2,4``, ``--config.FIELD=VALUE``, ...) through. For reference, the usual
starting point, torchvision's ResNet-50 V1 weights (``ResNet50_Weights.IMAGENET1K_V1``),
scores 76.13 % top-1 on ImageNet; there is no published number for your folder.

``--quick`` needs no download: it writes a 3-class folder of synthetic stripe patterns
(32x32) and a randomly initialised ``resnet8`` saved as torchvision-layout safetensors,
then fine-tunes for one epoch. It checks the path end to end; a random starting point
shows nothing about the benefit of pretraining.

Writes ``finetune.{csv,json}`` (one row per epoch) and ``finetune.png`` into ``--outdir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402
from common.references import REFERENCE_IMAGENET_RESNET50  # noqa: E402
from common.standins import make_pattern_folder, write_random_weights  # noqa: E402

from flax_resnet import cli  # noqa: E402

QUICK = {"model": "resnet8", "overrides": ["--config.image_size=32", "--config.batch_size=8",
                                           "--config.num_epochs=1", "--config.log_every_steps=2"]}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Other flags go to `flax-resnet finetune` (see `flax-resnet finetune --help`).")
    p.add_argument("--quick", action="store_true", help="synthetic folder, random weights, 1 epoch (used by the tests)")
    p.add_argument("--outdir", default=None, help="output directory (default runs/experiments/finetune[_quick])")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="weights (.safetensors or .pth)")
    p.add_argument("--model", default=None, help="the weights' architecture (default resnet50; quick: resnet8)")
    p.add_argument("--dataset", default=None, metavar="folder:PATH", help="folder:PATH or a prepared TFDS name")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (where a folder is prepared)")
    p.add_argument("--fresh", action="store_true", help="delete an earlier run in --outdir/run first")
    args, rest = p.parse_known_args(argv)
    if not args.quick and not (args.pretrained and args.dataset):
        p.error("pass --pretrained FILE and --dataset folder:PATH (or --quick)")
    args.outdir = args.outdir or f"runs/experiments/finetune{'_quick' if args.quick else ''}"
    return args, rest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parse(argv)
    out = Path(args.outdir)
    workdir = out / "run"
    model = args.model or (QUICK["model"] if args.quick else "resnet50")
    if args.quick:
        folder = make_pattern_folder(out / "data" / "patterns")
        args.dataset = args.dataset or f"folder:{folder.resolve()}"
        weights = out / "weights" / f"random_{model}.safetensors"
        args.pretrained = args.pretrained or str(write_random_weights(model, weights))
        args.data_dir = args.data_dir or str(out / "tfds")
        rest = [*QUICK["overrides"], *rest]
        args.fresh = True
    if args.fresh:
        runs.remove_run(workdir)
    refs = REFERENCE_IMAGENET_RESNET50["torchvision_v1_weights"]
    print(f"finetune: {model} from {args.pretrained} on {args.dataset}; machine: {runs.machine()}")
    print(f"reference: torchvision ResNet-50 V1 weights score {refs['top1']}% top-1 on ImageNet (the usual starting "
          "point); no published number exists for this folder")
    command = ["finetune", "--pretrained", args.pretrained, "--model", model, "--dataset", args.dataset,
               "--workdir", str(workdir), *(["--data_dir", args.data_dir] if args.data_dir else []), *rest]
    print("running: flax-resnet " + " ".join(command))
    rc = cli.main(command)
    if rc != 0:
        raise SystemExit(rc)

    r = runs.read_run(workdir)
    epochs = r.epoch_rows()
    s = r.summary_row()
    cmd = cmdline.command_line("finetune.py", argv)
    meta = {"command": cmd, "cli": "flax-resnet " + " ".join(command), "machine": runs.machine(), "model": model,
            "pretrained": args.pretrained, "dataset": args.dataset, "quick": args.quick, "summary": s,
            "reference": refs,
            "note": "random starting weights: checks the path, not the benefit of pretraining" if args.quick else None}
    written = report.write_table(epochs, out / "finetune", meta=meta)
    (ts, tr), (es, te) = r.training_error_curve(), r.test_error_curve()
    written.append(report.plot_lines(
        out / "finetune.png",
        [(f"fine-tuning {model}", [report.Series("train error (per log interval)", ts, tr, {"lw": 0.9}),
                                   report.Series("validation error (per epoch)", es, te, {"lw": 2, "marker": "o"})])],
        xlabel="iteration", ylabel="error (%)", ylim=(0, 100),
        suptitle=f"flax-resnet finetune on {args.dataset.split('/')[-1]}"
                 + (" (quick: random weights)" if args.quick else "")))
    print(f"\nfine-tuned {model}: final validation error {s['final_test_error']:.2f}%, best {s['best_test_error']:.2f}% "
          f"at epoch {s['best_epoch']} ({s['steps']} steps)")
    report.report_written(written)
    return {"summary": s, "epochs": epochs, "files": [str(p) for p in written]}


if __name__ == "__main__":
    main()
