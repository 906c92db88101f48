"""The training loop.

:func:`train_and_evaluate` is the one generic loop: it reads a config, builds the mesh,
data iterators, model, optimiser and jitted steps, resumes from the newest checkpoint
in ``workdir`` if there is one, trains epoch by epoch with one evaluation per epoch,
and writes checkpoints, ``metrics.jsonl``, TensorBoard events and ``curves.png``.

Fault tolerance lives here and in :mod:`flax_resnet.checkpoint`: a resumed run continues
bit-identically (state, RNG, optimiser and data-iterator position are restored); SIGTERM or
SIGINT stop the loop at the next step boundary with a checkpoint (``TrainSummary.preempted``);
a NaN/inf loss stops it with :class:`~flax_resnet.errors.TrainingDivergedError`, and no state
produced after a non-finite loss is ever saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_resnet import cpu, data, models, parallel
from flax_resnet.checkpoint import Checkpointer
from flax_resnet.configs import validate_config
from flax_resnet.training.preemption import PreemptionGuard
from flax_resnet.errors import TrainingDivergedError, UserError
from flax_resnet.training import logging as run_logging
from flax_resnet.training import optimizer, schedules, steps
from flax_resnet.training.epoch import global_batches, report_epoch, train_epoch
from flax_resnet.training.profiling import PhaseTimes, StepProfiler
from flax_resnet.training.evaluation import eval_batch_size, eval_pass, evaluate_split, image_size, normalize
from flax_resnet.training.restore import restore_model
from flax_resnet.training.saving import SaveQueue
from flax_resnet.training.resume_checks import check_resumable as _check_resumable, info_dict
from flax_resnet.training.state import (
    abstract_train_state, compute_dtype, count_params, ema_decay, model_graph, start_train_state, transfer_weights,
)

PrintFn = Callable[..., None]
EpochCallback = Callable[[int, dict], None]


@dataclasses.dataclass
class TrainSummary:
    """What a finished :func:`train_and_evaluate` reports."""

    workdir: str
    steps: int
    epochs: int
    final_top1: float
    final_loss: float
    best_top1: float
    best_epoch: int
    compile_s: float
    wall_s: float
    images_per_sec: float
    preempted: bool = False  # stopped early by SIGTERM/SIGINT, after saving a checkpoint at ``steps``
    eval_s: float = 0.0  # seconds spent evaluating, in all
    checkpoint_s: float = 0.0  # seconds the loop waited on checkpoint saves (their writes overlap training)
    stop_signal: str = ""
    final_ema_top1: float = float("nan")  # the weights' EMA (config.ema_decay > 0)


def format_config(config, indent: str = "  ") -> str:
    """The config as sorted ``key: value`` lines (nested dicts indented), for the run header."""
    lines = []

    def walk(d, prefix):
        for k in sorted(d):
            v = d[k]
            if isinstance(v, dict):
                lines.append(f"{prefix}{k}:" + ("" if v else " {}"))
                walk(v, prefix + indent)
            else:
                lines.append(f"{prefix}{k}: {v!r}" if isinstance(v, str) else f"{prefix}{k}: {v}")

    walk(config.to_dict() if hasattr(config, "to_dict") else dict(config), indent)
    return "\n".join(lines)


def _check_workdir(workdir: Path) -> None:
    """Creates ``workdir`` and proves it is writable, before anything is trained or saved."""
    probe = workdir / f".flax_resnet_write_test.{jax.process_index()}"  # one per process: they run concurrently
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to workdir {workdir} ({e.strerror or e}); pass a writable --workdir") from None


def _warn_fn(main: bool):
    return (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True)) if main else (lambda msg: None)


def _nonfinite(row: dict) -> str | None:
    for key in ("loss", "grad_norm"):
        if key in row and not np.isfinite(row[key]):
            return f"{key} is {float(row[key])}"
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       print_fn: PrintFn = print, mesh=None, init_from: str | Path | None = None,
                       new_head: bool = False, on_epoch_end: EpochCallback | None = None) -> TrainSummary:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and evaluates every epoch.

    Args:
      config: a recipe (see :mod:`flax_resnet.configs`), overrides applied.
      workdir: run directory for checkpoints, ``metrics.jsonl``, TensorBoard events, ``curves.png``.
        If it holds checkpoints, the newest good one is restored (damaged ones are set
        aside with a warning) and training continues exactly where it stopped.
      print_fn: where the human-readable lines go (only process 0 prints; warnings go to stderr).
      mesh: the device mesh (default: all devices, :func:`flax_resnet.parallel.create_mesh`).
      init_from: a fresh run (no checkpoint in ``workdir``) starts from the weights (params
        and BatchNorm statistics) of this run directory's best checkpoint instead of a
        random init; optimiser, step and data stream start afresh. Ignored when resuming.
      new_head: with ``init_from``, keep this model's freshly initialised classifier
        (``fc``) instead of the source's: the fine-tuning flow, where class counts may
        differ. Without it, any difference in weight names/shapes is a :class:`UserError`.
      on_epoch_end: called on every process as ``on_epoch_end(epoch, metrics)`` after each
        epoch's evaluation and checkpoint (``epoch`` counts from 1; ``metrics`` is the epoch's
        ``eval`` record in metrics.jsonl (``test_top1``, ``test_loss``, ``train_loss``, with an EMA
        ``ema_test_top1`` and ``ema_test_loss``, ...) plus ``step`` and ``best_top1`` (by
        ``config.best_metric``). An exception it raises
        (a hyperparameter search pruning the run, say) ends training there, that epoch saved.

    Returns:
      A :class:`TrainSummary` with final and best test top-1, compile time and throughput;
      ``preempted`` is set when SIGTERM/SIGINT stopped the run after saving a checkpoint.

    Raises:
      UserError: bad input (unknown model/dataset, bad batch size, unwritable workdir, a
        workdir holding a run of another model/dataset, ...), found before anything is
        written; :class:`TrainingDivergedError` when the loss becomes NaN/inf.
    """
    validate_config(config)  # bad values fail here, before anything starts or is written
    parallel.initialize_distributed()  # no-op unless launched as one of several processes
    t_start = time.perf_counter()
    main = run_logging.is_main_process()
    say = print_fn if main else (lambda *a, **k: None)
    warn = _warn_fn(main)
    workdir = Path(workdir)

    # Bad input fails here, before anything is written.
    models.get_spec(config.model)
    info = data.get_dataset_info(config.dataset, config.data_dir, image_size=image_size(config),
                                 normalize=normalize(config))
    mesh = parallel.create_mesh() if mesh is None else mesh
    parallel.check_batch_size(config.batch_size, mesh)
    accum = int(config.get("grad_accum_steps", 1) or 1)
    if accum > 1 and (config.batch_size // accum) % parallel.num_data_shards(mesh):
        raise UserError(f"--config.grad_accum_steps={accum}: micro-batches of {config.batch_size // accum} do not split "
                        f"over {parallel.num_data_shards(mesh)} devices; make batch_size a multiple of "
                        f"{accum * parallel.num_data_shards(mesh)}")
    eval_batches = eval_pass(config, info, eval_batch_size(config, mesh, info), mesh, uint8=True)
    _check_workdir(workdir)
    log_every = max(int(config.log_every_steps), 1)
    with contextlib.ExitStack() as stack:
        data_iter = data.train_iterator(
            config.dataset, batch_size=parallel.per_process_batch_size(config.batch_size), seed=config.seed,
            data_dir=config.data_dir, process_index=jax.process_index(), process_count=jax.process_count(),
            augment=config.augment, num_workers=config.num_workers, image_size=image_size(config),
            flip=bool(config.get("augment_flip", True)), normalize=normalize(config), uint8=True,
        )
        stack.callback(data_iter.close)
        data_position = data_iter.get_state
        steps_per_epoch = int(data_iter.steps_per_epoch)
        total_steps = int(config.num_train_steps) if config.num_train_steps > 0 else int(config.num_epochs) * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        lr_fn = schedules.create_learning_rate_fn(config, steps_per_epoch, total_steps)
        tx = optimizer.create_optimizer(config, lr_fn, steps_per_epoch)
        num_classes, in_channels = int(info.num_classes), int(info.image_shape[-1])
        dtype = compute_dtype(config)
        config_dict = config.to_dict()
        meta = {"dataset_info": info_dict(info)}

        say(f"config:\n{format_config(config)}")
        say(parallel.describe(mesh))
        say(f"dataset: {info.name} ({info.train_size} train / {info.eval_size} {info.eval_split}, "
            f"{num_classes} classes, {tuple(info.image_shape)}); global batch {config.batch_size}, "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps ({num_epochs} epochs)")
        if optimizer.uses_param_groups(config) or optimizer.freeze_bn_setting(config):
            say(optimizer.describe(config, steps_per_epoch))
        if (slow := cpu.bfloat16_warning(dtype)) is not None:
            warn(slow)

        ckpt = Checkpointer(workdir, save_every_steps=config.checkpoint_every_steps,
                            max_to_keep=config.max_to_keep, async_save=config.async_checkpointing, warn=warn)
        stack.callback(ckpt.close)
        abstract = graph = None
        if ckpt.latest_step() is not None or ckpt.best_step() is not None:
            abstract, graph = abstract_train_state(config, num_classes, in_channels, tx, mesh)
        restored = ckpt.resume(abstract, check=lambda saved, saved_meta: _check_resumable(
            saved, saved_meta, config, info, workdir))
        if restored is not None:
            state = restored.state
            if restored.data_state:
                data_iter.set_state(restored.data_state)
            say(f"resumed from {restored.path} at step {int(state.step)}")
        pending = None  # a fresh state's initialiser, compiling while the train step is traced
        if restored is None:
            state, graph, pending = start_train_state(config, num_classes, in_channels, tx, mesh)  # state: abstract
            if config.get("pretrained"):  # loaded by start_train_state
                say(f"initialised from {config.pretrained} (" + ("its head" if config.get("keep_pretrained_head")
                                                               else f"new {num_classes}-class head") + ")")
            if init_from is not None:
                state, pending = _init_weights_from(init_from, pending(), mesh, new_head=new_head), None
                say(f"initialised from {init_from}" + (" (new head)" if new_head else ""))
        say(f"model: {config.model} ({count_params(state.params):,} params, compute {jnp.dtype(dtype).name})")
        saves = SaveQueue(ckpt, background=bool(config.async_checkpointing) and jax.process_count() == 1)
        stack.callback(saves.close)  # before ckpt.close: queued saves finish first

        # One compiled step per set of BatchNorm-frozen groups (gradual unfreezing switches at a group's epoch).
        train_fns, graphs = {}, {optimizer.frozen_bn_groups(config, 0): graph}

        def train_fn_at(at: int):
            frozen = optimizer.frozen_bn_groups(config, at, steps_per_epoch)
            if frozen not in train_fns:
                g = graphs.get(frozen) or model_graph(config, num_classes, in_channels, frozen)
                train_fns[frozen] = steps.jit_train_step(
                    mesh, graph=g, tx=tx, learning_rate_fn=lr_fn, num_classes=num_classes,
                    label_smoothing=config.label_smoothing, compute_dtype=dtype, ema_decay=ema_decay(config),
                    grad_accum_steps=accum, image_mean=info.mean, image_std=info.std)
            return train_fns[frozen]
        eval_fn = steps.jit_eval_step(mesh, graph=graph, num_classes=num_classes, compute_dtype=dtype,
                                      image_mean=info.mean, image_std=info.std)
        state_is_finite = jax.jit(steps.all_finite)

        step = start_step = 0 if pending else int(state.step)
        logger = stack.enter_context(run_logging.RunLogger(workdir))
        logger.log_text("config", f"```\n{format_config(config)}\n```")
        if restored is not None:  # later records supersede earlier ones with a larger step
            logger.log("resume", step, {"checkpoint": str(restored.path)})
        guard = stack.enter_context(PreemptionGuard(sync_every=log_every))
        profiler = StepProfiler(config.get("profile_steps", ""), workdir / "profile", start_step)
        stack.callback(profiler.close)

        def diverged(at: int, what: str) -> TrainingDivergedError:
            last = saves.latest_step()
            kept = (f"the last good checkpoint, step {last} in {ckpt.workdir / 'checkpoints'}, is intact"
                    if last is not None else "no checkpoint was written")
            return TrainingDivergedError(
                f"training diverged at step {at}: {what}; stopped without saving it, {kept}. Lower "
                f"--config.learning_rate (now {config.learning_rate}) or lengthen the warm-up, then rerun", at)

        def check_metrics(rows, first_step):
            for i, row in enumerate(rows):
                what = _nonfinite(row)
                if what:
                    raise diverged(first_step + i, what)

        def save(st, n, save_meta=meta, *, force=False):
            """Every save goes through here: never a state with NaN/inf in it."""
            if saves.is_saved(n):
                return
            if not bool(state_is_finite(st.params, st.batch_stats, st.opt_state)):
                raise diverged(n, "the model state has NaN/inf values")
            position = data_position()
            if position.get("step") != n:  # the iterator is pulled on demand, so this is a bug
                raise RuntimeError(f"data iterator at batch {position.get('step')} but state at step {n}")
            with times("checkpoints"):
                saves.save(n, st, position, config_dict, save_meta, force=force)

        best_top1, best_epoch = ckpt.best_metric() or 0.0, 0
        by_ema = config.get("best_metric", "test_top1") == "ema_test_top1"
        score = lambda ev: ev["ema"]["top1"] if by_ema else ev["top1"]  # noqa: E731  (what picks the best checkpoint)

        def evaluate(st) -> dict:
            """Test metrics of ``st``'s weights, with its EMA's under ``"ema"`` when it has one."""
            with times("eval"):
                return _evaluate(st)

        def _evaluate(st) -> dict:
            ev = evaluate_split(eval_fn, st, eval_batches(), mesh, max_in_flight=in_flight)
            if st.ema is not None:
                ev["ema"] = evaluate_split(eval_fn, st.ema_weights(), eval_batches(), mesh, max_in_flight=in_flight)
            return ev

        final: dict[str, float] = {}
        compile_s, rates, times = 0.0, [], PhaseTimes()
        batches = None
        stopped = False
        in_flight = None  # steps dispatched but unfinished: cpu.steps_in_flight, from the compiled step's temporaries
        if step < total_steps:
            first = parallel.shard_batch(next(data_iter), mesh)
            t0 = time.perf_counter()
            frozen = optimizer.frozen_bn_groups(config, step, steps_per_epoch)
            # a fresh state is still abstract here: its initialiser compiles (or loads) on a thread meanwhile
            train_fns[frozen] = train_fn_at(step).lower(state, first).compile()
            compile_s = time.perf_counter() - t0
            # the eval step reuses the bound: no backward pass, so smaller temporaries unless its batch is far larger
            in_flight = cpu.steps_in_flight(train_fns[frozen])
            say(f"compiled train step in {compile_s:.1f}s")
            batches = global_batches(data_iter, mesh, first)
        if pending:  # a fresh state: its initialiser has compiled meanwhile
            state = pending()
        for epoch in range(step // steps_per_epoch, num_epochs):
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
            if epoch == num_epochs - 1:
                run_logging.warm_plotting()
            state, step, train_rows, epoch_rates, stopped = train_epoch(
                train_fn_at, state, batches, step=step, epoch=epoch, num_epochs=num_epochs,
                epoch_start=epoch * steps_per_epoch, epoch_end=epoch_end, config=config, logger=logger,
                save=save, should_save=ckpt.should_save, check_metrics=check_metrics, should_stop=guard.should_stop,
                profiler=profiler, max_in_flight=in_flight,
            )
            rates += epoch_rates
            if stopped:
                if step > start_step:
                    save(state, step, force=True)
                saves.wait()
                saved = saves.latest_step()
                say(f"stopped by {guard.signal_name or 'request'} at step {step}: "
                    + (f"checkpoint saved in {ckpt.workdir / 'checkpoints' / str(saved)}; rerun the same command "
                       "to resume" if saved is not None else "nothing trained yet, nothing saved"))
                break
            final = evaluate(state)
            record = report_epoch(say, logger, step, epoch + 1, num_epochs, train_rows, final, time.perf_counter() - t_start)
            epoch_meta = {**meta, "epoch": epoch + 1, "test_top1": final["top1"],
                          **({"ema_test_top1": final["ema"]["top1"]} if "ema" in final else {})}
            save(state, step, epoch_meta, force=True)
            if score(final) > best_top1:
                best_top1, best_epoch = score(final), epoch + 1
                with times("checkpoints"):
                    saves.save_best(step, state, data_position(), config_dict, epoch_meta, score(final))
            if on_epoch_end is not None:
                saves.wait()
                on_epoch_end(epoch + 1, {**record, "step": step, "best_top1": best_top1})
        if not final and not stopped:  # nothing left to train (a finished run): just report
            final = evaluate(state)
        run_logging.plot_curves(workdir, title=f"{config.model} on {info.name}")  # while the last saves write
        with times("checkpoints"):
            saves.wait()
    wall = time.perf_counter() - t_start
    ips = float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else 0.0
    final = final or {"top1": float("nan"), "loss": float("nan"), **({"ema": {"top1": float("nan")}} if by_ema else {})}
    if not stopped:
        timing = (f"{step - start_step} steps in {wall:.1f}s (compile {compile_s:.1f}s, eval {times['eval']:.1f}s, "
                  f"checkpoints {times['checkpoints']:.1f}s, ~{ips:.0f} images/s)"
                  if step > start_step else f"training was already complete at step {step}")
        say(f"final test top-1 {100 * final['top1']:.2f}% (loss {final['loss']:.4f}"
            + (f"; EMA {100 * final['ema']['top1']:.2f}%" if "ema" in final else "") + "); "
            + f"best {'EMA ' if by_ema else ''}{100 * max(best_top1, score(final)):.2f}%"
            + (f" at epoch {best_epoch}" if best_epoch else "") + f"; {timing}")
    return TrainSummary(
        workdir=str(workdir), steps=step, epochs=num_epochs, final_top1=final["top1"], final_loss=final["loss"],
        best_top1=max(best_top1, score(final)) if not stopped else best_top1, best_epoch=best_epoch,
        compile_s=compile_s, wall_s=wall, images_per_sec=ips, preempted=stopped, stop_signal=guard.signal_name,
        eval_s=times["eval"], checkpoint_s=times["checkpoints"],
        final_ema_top1=final["ema"]["top1"] if "ema" in final else float("nan"),
    )


def _init_weights_from(source: str | Path, state, mesh, *, new_head: bool):
    """``state`` with params and BatchNorm statistics taken from ``source``'s best checkpoint."""
    src = restore_model(source, "best", mesh=mesh)
    what = f"the checkpoint in {source} ({src.config.model})"
    params = transfer_weights(state.params, src.state.params, new_head=new_head, what=what)
    stats = transfer_weights(state.batch_stats, src.state.batch_stats, new_head=new_head, what=what)
    params, stats = parallel.replicate(params, mesh), parallel.replicate(stats, mesh)
    ema = None if state.ema is None else parallel.replicate({"params": params, "batch_stats": stats}, mesh)
    return state.replace(params=params, batch_stats=stats, ema=ema)
