"""What the scripts in ``experiments/`` share: run a recipe, collect its metrics, write tables and plots.

Each script in ``experiments/`` parses its flags, calls these functions and prints; the
logic lives here, once:

* :func:`choose_dataset`: CIFAR-10 when it is prepared, else the embedded ``digits`` (with a
  note saying so), or whatever the user named;
* :func:`run_recipe`: :func:`~flax_resnet.training.train_and_evaluate` on a recipe with
  overrides, returning its ``metrics.jsonl`` records (no second training loop);
* :func:`layer_gradient_norms` / :func:`gradient_flow`: per-layer gradient norms of the loss
  at initialisation and after ``k`` SGD steps of the training step;
* :func:`write_table` (CSV + JSON), :func:`plot_lines` (matplotlib, Agg backend) and
  :func:`machine` (what a number was measured on);
* the reference numbers the scripts print beside measured ones.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from flax_resnet.errors import DatasetNotPreparedError, TrainingDivergedError, UserError

PrintFn = Callable[..., None]

# He et al. 2015 (arXiv:1512.03385), Table 6: CIFAR-10 test error (%) of the 6n+2 ResNets.
# ResNet-110 is the best of 5 runs (mean 6.61 +/- 0.16).
PAPER_CIFAR10_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                            "resnet110": 6.43}
# ImageNet ResNet-50 top-1 accuracy (%), single 224 centre crop.
REFERENCE_IMAGENET_RESNET50 = {
    "flax_imagenet_example": {"top1": 76.5, "epochs": 100,
                              "source": "Flax examples/imagenet README: ResNet-50, 100 epochs"},
    "torchvision_v1_weights": {"top1": 76.13,
                               "source": "torchvision ResNet50_Weights.IMAGENET1K_V1 model card"},
}
IMAGENET_TRAIN_IMAGES = 1_281_167
# Which recipe trains on which dataset, for experiments that follow "the recipe of the dataset".
DATASET_RECIPES = {"cifar10": "cifar10_resnet20", "digits": "digits_resnet20"}


# --------------------------------------------------------------------------- environment
def machine() -> str:
    """One line naming what a number was measured on: CPU, cores, accelerators, load."""
    import jax

    devs = jax.devices()
    kind = devs[0].device_kind if devs else "?"
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores{load}; "
            f"jax {jax.__version__} on {len(devs)} x {devs[0].platform if devs else '?'} ({kind})")


def dataset_available(name: str, data_dir: str | None = None) -> bool:
    """True when ``name`` is prepared in ``data_dir`` (never downloads or prepares anything)."""
    from flax_resnet import data

    try:
        data.get_dataset_info(name, data_dir)
    except DatasetNotPreparedError:
        return False
    return True


def choose_dataset(requested: str | None = None, *, preferred: str = "cifar10", fallback: str = "digits",
                   data_dir: str | None = None) -> tuple[str, str | None]:
    """The dataset an experiment runs on, and a note to print when it is not the preferred one.

    ``requested`` (``"auto"`` or ``None`` means: ``preferred`` if prepared, else ``fallback``)
    must be prepared; a missing one raises the data layer's error with its prepare command.
    """
    from flax_resnet import data

    if requested not in (None, "", "auto"):
        data.get_dataset_info(requested, data_dir)  # fails at once, with the prepare command
        return requested, None
    if dataset_available(preferred, data_dir):
        return preferred, None
    note = (f"note: {preferred} is not prepared (run `{data.prepare_command(preferred, data_dir)}`); "
            f"running on the embedded '{fallback}' dataset instead. Numbers are NOT comparable to "
            f"the published {preferred} results.")
    return fallback, note


def recipe_for(dataset: str, default: str = "digits_resnet20") -> str:
    """The recipe whose hyper-parameters suit ``dataset`` (see :data:`DATASET_RECIPES`)."""
    return DATASET_RECIPES.get(dataset, default)


# --------------------------------------------------------------------------- runs
@dataclasses.dataclass
class RunResult:
    """One finished recipe run: its summary and its ``metrics.jsonl`` records."""

    name: str
    workdir: str
    config: dict[str, Any]
    summary: Any  # flax_resnet.training.TrainSummary
    train: list[dict[str, Any]]  # kind == "train" records (every log_every_steps)
    eval: list[dict[str, Any]]  # kind == "eval" records (every epoch)
    diverged_step: int | None = None  # the loss became NaN/inf at this step (the run stopped there)

    def training_error_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, training error %)``: 100 x (1 - mean top-1) over each log interval.

        The top-1 is measured on the augmented training batches in train mode, as the
        step computes it (the paper's Figure 6 plots the same kind of training error).
        """
        rows = _last_per_step(self.train)
        return (np.array([r["step"] for r in rows], np.int64),
                np.array([100.0 * (1.0 - r["top1"]) for r in rows], np.float64))

    def test_error_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, test error %)`` at the end of every epoch."""
        rows = _last_per_step(self.eval)
        return (np.array([r["step"] for r in rows], np.int64),
                np.array([100.0 * (1.0 - r["test_top1"]) for r in rows], np.float64))

    def epoch_rows(self) -> list[dict[str, Any]]:
        """One record per epoch: ``epoch, step, train_loss, train_error, test_loss, test_error`` (errors in %)."""
        by_epoch = {r["epoch"]: r for r in self.eval}
        return [{"model": self.config.get("model"), "epoch": e, "step": by_epoch[e]["step"],
                 "train_loss": by_epoch[e].get("train_loss"),
                 "train_error": _pct_error(by_epoch[e].get("train_top1")),
                 "test_loss": by_epoch[e]["test_loss"], "test_error": _pct_error(by_epoch[e]["test_top1"])}
                for e in sorted(by_epoch)]

    def summary_row(self) -> dict[str, Any]:
        """The run in one record: model, dataset, steps, final/best test error (%), time.

        From the :class:`TrainSummary` when this process ran it to the end, else from
        ``metrics.jsonl``.
        """
        row = {"model": self.config.get("model"), "dataset": self.config.get("dataset"),
               "diverged_step": self.diverged_step}
        s = self.summary
        if s is not None:
            return {**row, "steps": s.steps, "epochs": s.epochs, "final_train_error": self.final_training_error(),
                    "final_test_error": _pct_error(s.final_top1), "best_test_error": _pct_error(s.best_top1),
                    "best_epoch": s.best_epoch, "compile_s": round(s.compile_s, 1), "wall_s": round(s.wall_s, 1),
                    "images_per_sec": round(s.images_per_sec, 1)}
        epochs = self.epoch_rows()
        best = min(epochs, key=lambda e: e["test_error"]) if epochs else {}
        return {**row, "steps": epochs[-1]["step"] if epochs else 0, "epochs": len(epochs),
                "final_train_error": self.final_training_error(),
                "final_test_error": epochs[-1]["test_error"] if epochs else float("nan"),
                "best_test_error": best.get("test_error", float("nan")), "best_epoch": best.get("epoch"),
                "wall_s": round(self.eval[-1].get("elapsed_s", float("nan")), 1) if self.eval else None}

    def final_training_error(self, fraction: float = 0.25) -> float:
        """Mean training error (%) over the last ``fraction`` of the logged intervals."""
        _, err = self.training_error_curve()
        if not len(err):
            return float("nan")
        n = max(1, int(round(len(err) * fraction)))
        return float(err[-n:].mean())


def _pct_error(top1: float | None) -> float | None:
    return None if top1 is None else 100.0 * (1.0 - float(top1))


def _last_per_step(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by step, keeping the last one of each step (a resumed run may repeat some)."""
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def split_overrides(parser, argv: Sequence[str]):
    """``parser.parse_known_args(argv)`` where the only unknown arguments allowed are
    ``--config.FIELD=VALUE`` overrides (passed to every run); returns ``(args, overrides)``."""
    args, rest = parser.parse_known_args(list(argv))
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.num_epochs=3)")
    return args, rest


def experiment_parser(doc: str, name: str, quick_help: str, *, steps_help: str | None = None,
                      batch_help: str = "global batch (default: the recipe's)", fresh_help: str | None = None):
    """The arguments every experiment script shares: ``--quick``, ``--outdir``, ``--dataset``,
    ``--data-dir``, ``--batch-size``, and (when their help is given) ``--steps`` / ``--fresh``.
    Scripts add their own, then call :func:`parse_experiment_args`."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--outdir", default=None, help=f"output directory (default runs/experiments/{name}[_quick])")
    p.add_argument("--dataset", default=None, help="dataset (default: cifar10 if prepared, else digits; quick: digits)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    if steps_help:
        p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--batch-size", type=int, default=None, help=batch_help)
    if fresh_help:
        p.add_argument("--fresh", action="store_true", help=fresh_help)
    p.set_defaults(experiment_name=name)
    return p


def parse_experiment_args(parser, argv: Sequence[str], quick: Mapping[str, Any],
                          defaults: Mapping[str, Any] = {}):  # noqa: B006 (read only)
    """``(args, --config overrides)``. Arguments left unset take ``quick``'s values under
    ``--quick`` (which also means digits and a fresh run), then ``defaults``'."""
    args, overrides = split_overrides(parser, argv)
    if args.quick:
        args.dataset = args.dataset or "digits"
        if hasattr(args, "fresh"):
            args.fresh = True
    for source in ((quick if args.quick else {}), defaults):
        for key, value in source.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    args.outdir = args.outdir or f"runs/experiments/{args.experiment_name}{'_quick' if args.quick else ''}"
    return args, overrides


def experiment_dataset(args) -> tuple[str, str | None]:
    """:func:`choose_dataset` for a script's ``--dataset``/``--data-dir``; prints the fallback note."""
    dataset, note = choose_dataset(args.dataset, data_dir=args.data_dir)
    if note:
        print(note)
    return dataset, note


def run_overrides(args, **fields: str) -> dict[str, Any]:
    """Config overrides from the shared arguments that are set: ``num_train_steps`` (``--steps``),
    ``batch_size``, ``data_dir``, plus ``fields`` (config field -> argument name)."""
    names = {"num_train_steps": "steps", "batch_size": "batch_size", "data_dir": "data_dir", **fields}
    return {key: getattr(args, arg) for key, arg in names.items() if getattr(args, arg, None) is not None}


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces a result: ``python experiments/SCRIPT ARGS``."""
    import shlex

    return " ".join(["python", f"experiments/{script}", *map(shlex.quote, argv)])


def as_overrides(overrides: Mapping[str, Any] | Sequence[str] = ()) -> list[str]:
    """``{"model": "plain56", "num_epochs": 3}`` -> ``["--config.model=plain56", "--config.num_epochs=3"]``.

    Strings that already look like ``--config.x=y`` pass through unchanged, so user overrides
    from the command line mix with the experiment's own.
    """
    if isinstance(overrides, Mapping):
        return [f"--config.{k}={v}" for k, v in overrides.items()]
    return list(overrides)


def run_recipe(recipe: str, workdir: str | Path, overrides: Mapping[str, Any] | Sequence[str] = (), *,
               name: str | None = None, extra_overrides: Sequence[str] = (), fresh: bool = False,
               print_fn: PrintFn = print, verbose: bool = False) -> RunResult:
    """Trains ``recipe`` with overrides in ``workdir`` and returns what it logged.

    Args:
      recipe: a recipe name or path (see :mod:`flax_resnet.configs`).
      workdir: the run directory. A run already there resumes (or, when finished, is only
        re-evaluated), so an interrupted full-mode experiment continues where it stopped.
      overrides: the experiment's own config changes (a dict, or ``--config.x=y`` strings).
      extra_overrides: the user's ``--config.x=y`` strings, applied after ``overrides``.
      fresh: delete a previous run in ``workdir`` first (only a directory that looks like
        one; anything else is a :class:`UserError`, see :func:`remove_run`).
      print_fn: where the run's lines go, prefixed with ``[name]``.
      verbose: also print the run's config header.

    A run whose loss becomes NaN/inf is returned with ``diverged_step`` set and
    ``summary=None`` (what it logged before stays in ``train``/``eval``).
    """
    from flax_resnet.configs import load_config
    from flax_resnet.training import train_and_evaluate
    from flax_resnet.training.logging import read_metrics

    workdir = Path(workdir)
    name = name or workdir.name
    if fresh:
        remove_run(workdir)
    config = load_config(recipe, [*as_overrides(overrides), *extra_overrides])

    def say(*args, **kwargs):
        text = " ".join(str(a) for a in args)
        if verbose or not text.startswith("config:"):  # the config dump is one multi-line call
            print_fn(f"[{name}] {text}", **kwargs)

    summary, diverged = None, None
    try:
        summary = train_and_evaluate(config, workdir, print_fn=say)
    except TrainingDivergedError as e:  # a result, not a crash: deep plain nets can blow up
        diverged = int(getattr(e, "step", -1))
        print_fn(f"[{name}] diverged: {e}")
    return RunResult(name=name, workdir=str(workdir), config=config.to_dict(), summary=summary,
                     train=read_metrics(workdir, "train"), eval=read_metrics(workdir, "eval"),
                     diverged_step=diverged)


def read_run(workdir: str | Path, name: str | None = None) -> RunResult:
    """A finished run directory (``metrics.jsonl`` and the saved config) as a :class:`RunResult`
    with ``summary=None``: for runs started by another entry point, e.g. ``flax-resnet finetune``."""
    from flax_resnet.training.logging import read_metrics

    workdir = Path(workdir)
    config: dict[str, Any] = {}
    try:
        from flax_resnet.checkpoint import Checkpointer

        with Checkpointer(workdir, read_only=True) as ckpt:
            _, config, _ = ckpt.restore_config("latest")
    except Exception:  # noqa: BLE001 - the metrics alone still make a table
        pass
    return RunResult(name=name or workdir.name, workdir=str(workdir), config=dict(config), summary=None,
                     train=read_metrics(workdir, "train"), eval=read_metrics(workdir, "eval"))


def remove_run(workdir: str | Path) -> None:
    """Deletes a run directory (``metrics.jsonl``, ``checkpoints/`` or TensorBoard events in it, or
    empty); refuses any other directory with a :class:`UserError`."""
    workdir = Path(workdir)
    if not workdir.exists():
        return
    looks_like_run = ((workdir / "metrics.jsonl").exists() or (workdir / "checkpoints").is_dir()
                      or any(workdir.glob("events.out.tfevents.*")) or not any(workdir.iterdir()))
    if not looks_like_run:
        raise UserError(f"{workdir} exists but holds no run (no metrics.jsonl or checkpoints/); "
                        "pick another --outdir or remove it yourself")
    shutil.rmtree(workdir)


def recipe_plan(recipe: str, train_size: int, *, num_classes: int, in_channels: int = 3,
                overrides: Sequence[str] = (), points: int = 101) -> dict[str, Any]:
    """What a recipe would do on a dataset of ``train_size`` images, without data or training.

    Builds the model abstractly (no allocation, no compile) for its parameter count and
    evaluates the learning-rate schedule. Returns ``model``, ``params``, ``batch_size``,
    ``steps_per_epoch``, ``total_steps``, ``epochs``, ``peak_lr`` and ``schedule``
    (``points`` pairs ``(epoch, lr)``).
    """
    from flax import nnx

    from flax_resnet.configs import load_config
    from flax_resnet.models import count_params
    from flax_resnet.training import schedules
    from flax_resnet.training.state import create_model

    config = load_config(recipe, overrides)
    steps_per_epoch = train_size // config.batch_size
    total = int(config.num_train_steps) if config.num_train_steps > 0 else int(config.num_epochs) * steps_per_epoch
    lr_fn = schedules.create_learning_rate_fn(config, steps_per_epoch, total)
    at = np.linspace(0, total - 1, points).round().astype(int)
    lrs = [float(lr_fn(int(s))) for s in at]
    model = nnx.eval_shape(lambda: create_model(config, num_classes, in_channels))
    return {"recipe": recipe, "model": config.model, "params": count_params(model), "batch_size": config.batch_size,
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "epochs": total / steps_per_epoch,
            "peak_lr": max(lrs), "final_lr": lrs[-1], "schedule": [(float(s) / steps_per_epoch, lr) for s, lr in zip(at, lrs)]}


def make_pattern_folder(root: str | Path, *, classes: int = 3, train_per_class: int = 16, val_per_class: int = 6,
                        size: int = 32, seed: int = 0) -> Path:
    """Writes ``root/{train,val}/class_k/*.png``: a small, learnable image-folder dataset.

    Class ``k`` is a stripe pattern at angle ``k * 180 / classes`` degrees with a random
    phase, colour and noise, so a network can tell the classes apart within a few steps.
    For quick runs of the fine-tuning path; offline.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            angle = np.pi * k / classes
            for i in range(n):
                wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / 6 + rng.uniform(0, 2 * np.pi))
                colour = rng.uniform(0.4, 1.0, size=3)
                img = 127.5 + 100 * wave[..., None] * colour + rng.normal(0, 12, size=(size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def write_random_weights(model: str, path: str | Path, *, seed: int = 0) -> Path:
    """Saves a freshly initialised ``model`` as torchvision-layout ``.safetensors``.

    A stand-in for downloaded weights where there is no network: it exercises the
    fine-tuning path, not the benefit of pretraining.
    """
    from flax_resnet import pretrained
    from flax_resnet.models import create_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pretrained.export_safetensors(create_model(model, seed=seed), path,
                                  metadata={"model": model, "source": "random initialisation (flax_resnet.experiments)"})
    return path


# --------------------------------------------------------------------------- gradient flow
def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _layer_order(path: tuple[str, ...]) -> tuple:
    """Forward order of a parameter path: stem, then stage/block/layer, then the head."""
    head = path[0]
    if head.startswith("layer") and head[5:].isdigit():
        block = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
        sub = path[2] if len(path) > 2 else ""
        # conv1 < conv2 < conv3 < downsample within a block
        rank = {"conv1": 0, "conv2": 1, "conv3": 2}.get(sub, 3)
        return (1, int(head[5:]), block, rank, path)
    if head in ("fc", "bn_final"):
        return (2, 0, 0, 0, path)
    return (0, 0, 0, 0, path)


def kernel_paths(params: Any) -> list[tuple[str, ...]]:
    """Paths of every conv/linear ``kernel`` of a params pytree, in forward order."""
    import jax

    paths = [tuple(_key_name(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return sorted((p for p in paths if p[-1] == "kernel"), key=_layer_order)


def _get(tree: Any, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k if k in tree else int(k)]
    return tree


def loss_gradient_fn(graph, num_classes: int):
    """A jitted ``(params, batch_stats, images, labels) -> d(loss)/d(params)``.

    The loss is the mean cross-entropy with BatchNorm in train mode (batch statistics), as
    in the training step; the running statistics it would update are discarded.
    """
    import jax
    import jax.numpy as jnp

    from flax_resnet.training.steps import cross_entropy_loss

    def grads(params, batch_stats, images, labels):
        def loss(p):
            logits, _ = graph.apply(p, batch_stats, images, train=True)
            return cross_entropy_loss(logits.astype(jnp.float32), labels, num_classes).mean()

        return jax.grad(loss)(params)

    return jax.jit(grads)


def layer_gradient_norms(grads, params) -> list[dict[str, Any]]:
    """L2 norms of the gradient of each conv/linear kernel, in forward order.

    Returns one record per kernel: ``index`` (1-based, forward order), ``layer`` (e.g.
    ``layer2.3.conv1``), ``block`` (``stem``, ``layer2.3`` or ``head``), ``grad_norm``,
    ``weight_norm`` and ``ratio`` (``grad_norm / weight_norm``).
    """
    import jax

    grads, params = jax.device_get((grads, params))
    rows = []
    for i, path in enumerate(kernel_paths(params), start=1):
        g = float(np.linalg.norm(np.asarray(_get(grads, path), np.float64)))
        w = float(np.linalg.norm(np.asarray(_get(params, path), np.float64)))
        block = "head" if path[0] == "fc" else ".".join(path[:2]) if path[0].startswith("layer") else "stem"
        rows.append({"index": i, "layer": ".".join(path[:-1]), "block": block, "grad_norm": g, "weight_norm": w,
                     "ratio": g / w if w else float("nan")})
    return rows


def gradient_flow(model: str, *, dataset: str, steps: Sequence[int] = (0, 10), recipe: str | None = None,
                  batch_size: int = 128, seed: int = 0, data_dir: str | None = None,
                  extra_overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per-layer gradient norms of ``model`` after each number of SGD steps in ``steps``.

    The model, optimiser and schedule come from ``recipe`` (default: the dataset's, see
    :func:`recipe_for`) with ``model``, ``dataset``, ``batch_size`` and ``seed`` overridden;
    the updates are the library's jitted training step on augmented training batches. The
    norms are always measured on the same fixed probe batch (the first ``batch_size``
    training images, not augmented). Returns the records of :func:`layer_gradient_norms`
    with ``model`` and ``step`` added.
    """
    import jax.numpy as jnp

    from flax_resnet import data, parallel
    from flax_resnet.configs import load_config
    from flax_resnet.training import schedules
    from flax_resnet.training import steps as step_fns
    from flax_resnet.training.state import compute_dtype, create_optimizer, create_train_state

    config = load_config(recipe or recipe_for(dataset), [
        *as_overrides({"model": model, "dataset": dataset, "batch_size": batch_size, "seed": seed}),
        *([f"--config.data_dir={data_dir}"] if data_dir else []), *extra_overrides])
    info = data.get_dataset_info(config.dataset, config.data_dir)
    num_classes, in_channels = int(info.num_classes), int(info.image_shape[-1])
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    todo = sorted({int(s) for s in steps})
    with data.train_iterator(config.dataset, batch_size=config.batch_size, seed=config.seed,
                             data_dir=config.data_dir, augment=False) as probe_iter:
        probe = next(probe_iter)
    images, labels = jnp.asarray(probe["image"]), jnp.asarray(probe["label"])
    it = data.train_iterator(config.dataset, batch_size=parallel.per_process_batch_size(config.batch_size),
                             seed=config.seed + 1, data_dir=config.data_dir, augment=config.augment)
    try:
        total = max(todo[-1], 1)
        lr_fn = schedules.create_learning_rate_fn(config, int(it.steps_per_epoch), total)
        tx = create_optimizer(config, lr_fn)
        state, graph = create_train_state(config, num_classes, in_channels, tx, mesh)
        train_fn = step_fns.jit_train_step(mesh, graph=graph, tx=tx, learning_rate_fn=lr_fn,
                                           num_classes=num_classes, label_smoothing=config.label_smoothing,
                                           compute_dtype=compute_dtype(config))
        grad_fn = loss_gradient_fn(graph, num_classes)
        rows, done = [], 0
        for target in todo:
            while done < target:
                state, _ = train_fn(state, parallel.shard_batch(next(it), mesh))
                done += 1
            grads = grad_fn(state.params, state.batch_stats, images, labels)
            for r in layer_gradient_norms(grads, state.params):
                rows.append({"model": model, "step": target, **r})
    finally:
        it.close()
    return rows


def summarize_gradient_flow(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``(model, step)``: first conv layer, last conv layer and head gradient norms, the first
    conv layer's weight norm and gradient/weight ratio, and the spread (largest / smallest
    conv-layer gradient norm)."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["step"]) for r in rows))
    for model, step in keys:
        sel = [r for r in rows if r["model"] == model and r["step"] == step]
        convs = [r for r in sel if r["block"] != "head"]
        head = [r for r in sel if r["block"] == "head"]
        g = np.array([r["grad_norm"] for r in convs])
        out.append({
            "model": model, "step": step, "conv_layers": len(convs),
            "first_conv_grad": float(g[0]), "last_conv_grad": float(g[-1]),
            "first_conv_weight": float(convs[0]["weight_norm"]), "first_conv_ratio": float(convs[0]["ratio"]),
            "head_grad": float(head[-1]["grad_norm"]) if head else float("nan"),
            "first_over_last": float(g[0] / g[-1]), "max_over_min": float(g.max() / g.min()),
        })
    return out


# --------------------------------------------------------------------------- tables and plots
def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path, *, meta: Mapping[str, Any] | None = None,
                columns: Sequence[str] | None = None) -> list[Path]:
    """Writes ``rows`` as ``PATH.csv`` and ``PATH.json`` (``{"meta": ..., "rows": [...]}``).

    ``path`` is given without extension. Returns the two paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})
    with open(json_path, "w") as f:
        json.dump({"meta": dict(meta or {}), "rows": [dict(r) for r in rows]}, f, indent=1, default=_json_default)
    return [csv_path, json_path]


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    return path


@dataclasses.dataclass
class Series:
    """One line of a plot."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: dict[str, Any] = dataclasses.field(default_factory=dict)


def plot_lines(path: str | Path, panels: Sequence[tuple[str, Sequence[Series]]], *,
               xlabel: str | Sequence[str], ylabel: str | Sequence[str],
               suptitle: str = "", logy: bool = False,
               ylim: tuple[float, float] | Sequence[tuple[float, float] | None] | None = None,
               sharey: bool = True) -> Path:
    """Draws one or more side-by-side panels of lines into a PNG (matplotlib, Agg backend).

    Args:
      path: the PNG file.
      panels: ``(title, [Series, ...])`` per panel.
      xlabel, ylabel: axis labels, one for every panel or one per panel.
      suptitle: an overall title.
      logy: logarithmic y axis.
      ylim: y range of every panel, or one range (or None) per panel.
      sharey: panels share the y axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), sharey=sharey, squeeze=False)
    xlabels = [xlabel] * len(panels) if isinstance(xlabel, str) else list(xlabel)
    ylabels = [ylabel] + [""] * (len(panels) - 1) if isinstance(ylabel, str) else list(ylabel)
    if ylim is None or (len(ylim) == 2 and all(isinstance(v, (int, float)) for v in ylim)):
        ylims = [ylim] * len(panels)
    else:
        ylims = list(ylim)
    for ax, (title, series), xl, yl, lim in zip(axes[0], panels, xlabels, ylabels, ylims):
        for s in series:
            ax.plot(s.x, s.y, label=s.label, **s.style)
        ax.set(title=title, xlabel=xl)
        if yl:
            ax.set_ylabel(yl)
        if logy:
            ax.set_yscale("log")
        if lim is not None:
            ax.set_ylim(*lim)
        ax.grid(alpha=0.3, which="both" if logy else "major")
        if series:
            ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_written(paths: Iterable[str | Path], print_fn: PrintFn = print) -> None:
    """Prints where the outputs went, one file a line."""
    paths = [Path(p) for p in paths]
    print_fn(f"wrote {len(paths)} files:")
    for p in paths:
        print_fn(f"  {p}")
