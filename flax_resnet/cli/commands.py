"""The existing subcommands: models, train, evaluate, predict, prepare, finetune, convert, benchmark.

Each ``_add_*`` adds one subparser whose ``func`` parses nothing further and calls one library
function; the package's heavy modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import sys

from flax_resnet.errors import UserError

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3
EXIT_MULTIPROCESS_ERROR = 4

# --------------------------------------------------------------------------- models
def _add_models(sub):
    p = sub.add_parser("models", help="list registered models with parameter counts and GFLOPs")
    p.add_argument("--filter", default="", help="only names containing this substring")
    p.add_argument("--no-flops", action="store_true", help="skip the (slower) FLOP count")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args):
    from flax_resnet.models import summary

    print(summary.format_model_table(name_filter=args.filter, with_flops=not args.no_flops))


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
    _add_distributed_flags(p)
    p.set_defaults(func=_cmd_train, accepts_overrides=True, skip_teardown=True)  # every output closed on return


def _add_distributed_flags(p):
    g = p.add_argument_group(
        "multi-process training",
        "Start the same command once per process (one per host, or per GPU), each with its own "
        "--process_id; the workdir must be on storage every process sees. Without these flags the "
        "FLAX_RESNET_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID variables are read, and under "
        "SLURM (srun), Open MPI or FLAX_RESNET_DISTRIBUTED=on (TPU pods) JAX detects them itself.")
    g.add_argument("--coordinator_address", "--coordinator-address", dest="coordinator_address", default=None,
                   metavar="HOST:PORT", help="process 0's host and a free port, the same on every process")
    g.add_argument("--num_processes", "--num-processes", dest="num_processes", type=int, default=None,
                   metavar="N", help="number of processes in the run")
    g.add_argument("--process_id", "--process-id", dest="process_id", type=int, default=None,
                   metavar="I", help="this process, 0..N-1 (0 runs the coordinator)")


def _cmd_train(args):
    from pathlib import Path

    from flax_resnet import parallel
    from flax_resnet.configs import DEFAULT_CONFIG, load_config
    from flax_resnet.training import train_and_evaluate
    from flax_resnet.training.logging import is_main_process

    name = args.config or DEFAULT_CONFIG
    config = load_config(name, args.overrides)  # no JAX computation before this point
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    _enable_compilation_cache()  # reused by resumed runs and reruns (JAX_COMPILATION_CACHE_DIR wins)
    workdir = args.workdir or str(Path("runs") / Path(name).stem)
    # Flushed: status lines reach a redirected log at once (a killed job keeps them).
    summary = train_and_evaluate(config, workdir, print_fn=lambda *a, **k: print(*a, **k, flush=True))
    if is_main_process():
        print(f"outputs in {workdir}: metrics.jsonl, curves.png, TensorBoard events, checkpoints/")
    return EXIT_PREEMPTED if summary.preempted else 0


def _enable_compilation_cache() -> None:
    """The persistent compilation cache (:func:`flax_resnet.parallel.enable_compilation_cache`), keeping
    every program a run compiles, not only those of a second or more: a run's eval step, its finiteness
    check and its small eager programs each take 0.1-0.7 s to compile on 2 cores and milliseconds to load.
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` wins."""
    import os

    import jax

    from flax_resnet import parallel

    if parallel.enable_compilation_cache() and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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


# --------------------------------------------------------------------------- fine-tuning and weights
def _add_finetune(sub):
    p = sub.add_parser(
        "finetune", help="fine-tune torchvision/timm weights on an image folder (new head)",
        description="Fine-tune pretrained weights (.safetensors or .pth, torchvision/timm layout) on a "
                    "dataset, with a new head sized to its classes. A folder:PATH dataset is prepared "
                    "on first use. Resumes from --workdir like `train`. Any --config.FIELD=VALUE applies.",
    )
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="weights file (.safetensors, or .pth read with torch.load(weights_only=True)), "
                        "or a flax_resnet run directory (its best checkpoint)")
    p.add_argument("--model", default=None, help="the weights' architecture (default: the recipe's, resnet50)")
    p.add_argument("--dataset", default=None, metavar="folder:PATH",
                   help="folder:PATH with PATH/train/<class>/* and PATH/val/<class>/*, or a prepared TFDS name")
    p.add_argument("--config", default="finetune_folder", metavar="NAME|PATH",
                   help="recipe to start from (default finetune_folder)")
    p.add_argument("--workdir", default=None, help="run directory (default runs/finetune_<model>)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None, help="TFDS data directory")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="train only the head; the backbone gets exactly zero updates")
    p.add_argument("--freeze-bn-stats", action=argparse.BooleanOptionalAction, default=None,
                   help="backbone BatchNorm normalises with, and keeps, its running statistics for the "
                        "whole run (default: a group's statistics are frozen while its weights are)")
    p.add_argument("--backbone-lr-mult", type=float, default=None, metavar="X",
                   help="backbone learning rate = learning_rate * X (recipe default 0.1)")
    p.add_argument("--unfreeze-epochs", default=None, metavar="E1,E2,...",
                   help="gradual unfreezing: epoch from which each backbone group, from the top "
                        "(layer4, layer3, ..., stem), trains; unlisted groups stay frozen")
    p.set_defaults(func=_cmd_finetune, accepts_overrides=True)


def _cmd_finetune(args):
    from flax_resnet.configs import apply_overrides, get_config
    from flax_resnet.training.finetune import finetune

    config = get_config(args.config)
    flags = {"pretrained": args.pretrained, "model": args.model, "dataset": args.dataset,
             "data_dir": args.data_dir, "freeze_backbone": args.freeze_backbone,
             "freeze_bn_stats": args.freeze_bn_stats, "backbone_lr_mult": args.backbone_lr_mult}
    with config.ignore_type():
        for key, value in flags.items():
            if value is not None:
                config[key] = value
        if args.unfreeze_epochs is not None:
            try:
                config.unfreeze_epochs = tuple(float(e) for e in args.unfreeze_epochs.split(",") if e.strip())
            except ValueError:
                raise UserError(f"--unfreeze-epochs {args.unfreeze_epochs!r}: give epochs like 1,2,3") from None
    config = apply_overrides(config, args.overrides)
    workdir = args.workdir or f"runs/finetune_{config.model}"
    _enable_compilation_cache()
    finetune(config, workdir)
    print(f"outputs in {workdir}: metrics.jsonl, curves.png, TensorBoard events, checkpoints/; "
          f"export with: flax-resnet convert {workdir} OUT.safetensors")


def _add_convert(sub):
    p = sub.add_parser(
        "convert", help="check torchvision/timm or the article's weights against a model, or export a run",
        description="IN is a weights file (.pth/.pt read with torch.load(weights_only=True), or "
                    ".safetensors) of the architecture --model names, or a flax_resnet run directory. "
                    "OUT is a .safetensors file in the PyTorch original's layout (torchvision's; the "
                    "article's code's for article_resnet), readable without PyTorch here and by the "
                    "original's load_state_dict(strict=True) there.",
    )
    p.add_argument("src", metavar="IN", help="weights file or run directory")
    p.add_argument("dst", metavar="OUT", help="output .safetensors file")
    p.add_argument("--model", default=None, help="architecture of IN's weights, e.g. resnet50 (for files)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="for a run directory: the best (default) or the newest checkpoint")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args):
    from flax_resnet.convert import convert

    print(convert(args.src, args.dst, model=args.model, which=args.checkpoint))


# --------------------------------------------------------------------------- benchmark
def _add_benchmark(sub):
    p = sub.add_parser(
        "benchmark", help="time the real train/eval step (images/s, compile, memory, FLOP/s) as JSON",
        description="Time our jitted train step (and eval step) on a synthetic batch: compile time, "
                    "median images/s over repeats after warm-up, XLA's memory plan, FLOPs. "
                    "--compare-torch times the same network in PyTorch (channels_last, same SGD) with "
                    "its repeats interleaved with ours and reports the ratio. JSON goes to stdout "
                    "(and --output), a summary to stderr.")
    p.add_argument("--model", default=None, help="a registered model (default resnet20; --job: the recipe's)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch size (default 128; with --inference the throughput batch, default 64; "
                        "--job: the recipe's)")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                   help="square input side (default: the model's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters stay float32 (bfloat16 = PyTorch autocast for --compare-torch)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat (default 10)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats; the median is reported (default 5; --job: 2 pairs of runs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the eval step")
    p.add_argument("--compare-torch", action="store_true", help="also time the PyTorch reference, interleaved")
    p.add_argument("--torch-compile", action="store_true",
                   help="also time the PyTorch model under torch.compile (beside eager, interleaved)")
    p.add_argument("--no-cpu-fast-path", dest="cpu_fast_path", action="store_false",
                   help="on CPU, build the model from the plain layers instead of flax_resnet.cpu's (as "
                        "--config.cpu_fast_path=false does for training); same parameters")
    p.add_argument("--compare-plain", action="store_true",
                   help="also time our step built from the plain layers, interleaved")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the fraction-of-peak figure (default: known GPUs' bf16 peak)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--loop", action="store_true",
                   help="instead: images/s through the real training loop (digits data, logging) vs the bare step")
    p.add_argument("--loop-train-images", type=int, default=0, metavar="N",
                   help="--loop on a synthetic cifar10 of N training images instead of digits")
    p.add_argument("--inference", action="store_true",
                   help="instead: batch-1 latency (median, p99) and batch-64 throughput of our eval step, the ONNX "
                        "export in onnxruntime and PyTorch eager, interleaved")
    p.add_argument("--latency-calls", type=int, default=200, metavar="N",
                   help="--inference: timed batch-1 calls per engine (default 200)")
    p.add_argument("--job", action="store_true",
                   help="instead: the main job end to end, `flax-resnet train` (wall time from spawn to exit, "
                        "fresh workdir, warm compilation cache) against a plain PyTorch loop of the same data, "
                        "network and recipe, alternately")
    p.add_argument("--job-config", default="digits_resnet20", metavar="NAME",
                   help="--job: the recipe (default digits_resnet20)")
    p.add_argument("--job-epochs", type=int, default=None, metavar="N", help="--job: epochs (default: the recipe's)")
    p.add_argument("--job-dir", default=None, metavar="DIR", help="--job: keep the workdirs and timed logs here")
    p.add_argument("--no-job-warmup", dest="job_warmup", action="store_false",
                   help="--job: no untimed run of each job first (ours then compiles unless the cache holds it)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help="--job: TFDS data directory")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_benchmark, accepts_overrides=True)  # --job: --config.FIELD=VALUE for both jobs


def _cmd_benchmark(args):
    import json

    from flax_resnet import benchmark, parallel

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    parallel.enable_compilation_cache()  # as `train` does: a second run times a cached restart
    batch = (64 if args.inference else 128) if args.batch is None else args.batch
    model = args.model or "resnet20"
    repeats = args.repeats if args.repeats is not None else (2 if args.job else 5)
    if args.overrides and not args.job:
        raise UserError(f"{args.overrides[0]}: --config.FIELD=VALUE overrides apply to --job only")
    if args.job:
        result = benchmark.run_job_race(args.job_config, model=args.model, batch=args.batch, epochs=args.job_epochs,
                                        data_dir=args.data_dir, repeats=repeats, warmup=args.job_warmup,
                                        keep_dir=args.job_dir, overrides=args.overrides, log=log)
        log(benchmark.format_job_summary(result))
    elif args.inference:
        result = benchmark.run_inference_benchmark(
            model, image_size=args.image_size, batch=batch, latency_calls=args.latency_calls,
            steps=args.steps, repeats=repeats, in_channels=args.in_channels, num_classes=args.num_classes,
            cpu_fast_path=args.cpu_fast_path, log=log)
        log(benchmark.format_inference_summary(result))
    elif args.loop:
        result = benchmark.loop_overhead(model=model, batch=batch, steps=args.steps * repeats,
                                         synthetic_train_images=args.loop_train_images, log=log)
        log(benchmark.format_loop_summary(result))
    else:
        cfg = benchmark.BenchmarkConfig(
            model=model, batch=batch, image_size=args.image_size, dtype=args.dtype, steps=args.steps,
            repeats=repeats, warmup=args.warmup, eval=args.eval, compare_torch=args.compare_torch,
            torch_compile=args.torch_compile, in_channels=args.in_channels, num_classes=args.num_classes,
            cpu_fast_path=args.cpu_fast_path, compare_plain=args.compare_plain,
            peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
        result = benchmark.run_benchmark(cfg, log=log)
        log(benchmark.format_summary(result))
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


SUBCOMMANDS = [_add_models, _add_train, _add_evaluate, _add_predict, _add_prepare, _add_finetune,
               _add_convert, _add_benchmark]
