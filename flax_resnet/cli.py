"""The ``flax-resnet`` command line.

Each subcommand parses its flags, calls one library function and prints the result.
Logic lives in the package; this file only wires argparse to it.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from flax_resnet.errors import UserError


# --------------------------------------------------------------------------- models
def _add_models(sub):
    p = sub.add_parser("models", help="list registered models with parameter counts and GFLOPs")
    p.add_argument("--filter", default="", help="only names containing this substring")
    p.add_argument("--no-flops", action="store_true", help="skip the (slower) FLOP count")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args):
    from flax_resnet.models import registry

    print(registry.format_model_table(name_filter=args.filter, with_flops=not args.no_flops))


# --------------------------------------------------------------------------- train / evaluate / predict
def _add_train(sub):
    p = sub.add_parser(
        "train", help="train a recipe (default: ResNet-20 on the embedded digits dataset)",
        description="Train a recipe. Override any config field with --config.FIELD=VALUE, "
                    "e.g. --config.num_epochs=3. Resumes from the newest checkpoint in --workdir.",
    )
    from flax_resnet.configs import DEFAULT_CONFIG, list_configs

    p.add_argument("--config", default=None, metavar="NAME|PATH",
                   help=f"a recipe ({', '.join(list_configs())}; default {DEFAULT_CONFIG}) or a path to a .py file")
    p.add_argument("--workdir", default=None,
                   help="run directory for checkpoints and logs (default runs/<config name>)")
    p.set_defaults(func=_cmd_train, accepts_overrides=True)


def _cmd_train(args):
    from pathlib import Path

    from flax_resnet.configs import DEFAULT_CONFIG, load_config
    from flax_resnet.training import train_and_evaluate

    name = args.config or DEFAULT_CONFIG
    config = load_config(name, args.overrides)
    workdir = args.workdir or str(Path("runs") / Path(name).stem)
    train_and_evaluate(config, workdir)
    print(f"outputs in {workdir}: metrics.jsonl, curves.png, TensorBoard events, checkpoints/")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="evaluate a trained run's checkpoint on its test split")
    p.add_argument("--workdir", required=True, help="the run directory given to `train`")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="the best-by-test-accuracy checkpoint (default) or the newest one")
    p.add_argument("--split", default=None, help="dataset split (default: the run's evaluation split)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                   help="dataset directory, if not the one used in training")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args):
    from flax_resnet.training import evaluate

    r = evaluate(args.workdir, which=args.checkpoint, split=args.split, data_dir=args.data_dir)
    top5 = f"  top-5 {100 * r['top5']:.2f}%" if "top5" in r else ""
    print(f"{r['model']} step {r['step']} on {r['dataset']}/{r['split']} ({r['count']} images): "
          f"loss {r['loss']:.4f}  top-1 {100 * r['top1']:.2f}%{top5}")


def _add_predict(sub):
    p = sub.add_parser("predict", help="top-5 classes with probabilities for image files")
    p.add_argument("--workdir", required=True, help="the run directory given to `train`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="the best-by-test-accuracy checkpoint (default) or the newest one")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args):
    from flax_resnet.training import predict

    for path, top in zip(args.images, predict(args.workdir, args.images, which=args.checkpoint, top_k=args.top_k)):
        print(path)
        for name, prob in top:
            print(f"  {prob:7.2%}  {name}")


# --------------------------------------------------------------------------- prepare
def _add_prepare(sub):
    p = sub.add_parser(
        "prepare", help="write a dataset as array_record (TFDS name, digits, or folder:PATH)",
        description="Prepare DATASET in the TFDS data directory as array_record: a TFDS name "
                    "(cifar10, cifar100, imagenet2012, imagenette, ...; needs flax-resnet[prepare]), "
                    "'digits', or 'folder:PATH' with PATH/train/<class>/* and PATH/val/<class>/*.",
    )
    p.add_argument("dataset", metavar="DATASET", help="cifar10, imagenet2012, digits, folder:PATH, ...")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                   help="TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--manual_dir", "--manual-dir", dest="manual_dir", default=None,
                   help="manually downloaded files, e.g. ImageNet's ILSVRC2012_img_{train,val}.tar "
                        "(default DATA_DIR/downloads/manual)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args):
    from flax_resnet.data import prepare

    print(prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir))


# --------------------------------------------------------------------------- main
_SUBCOMMANDS = [_add_models, _add_train, _add_evaluate, _add_predict, _add_prepare]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flax-resnet", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
