"""One epoch of training and its report: the loop's inner part, apart from its set-up.

:func:`train_epoch` runs the jitted steps of one epoch with a progress bar, fetching
metrics one log interval late so that fetching them never waits on a step (on XLA:CPU the
steps in flight are bounded: :func:`flax_resnet.cpu.steps_in_flight`);
:func:`report_epoch` writes and prints the per-epoch evaluation record.
"""

from __future__ import annotations

import jax

from flax_resnet import cpu, parallel
from flax_resnet.training import logging as run_logging


def global_batches(data_iter, mesh, first=None):
    """Global sharded batches, pulling from ``data_iter`` only on demand (its position stays exact)."""
    if first is not None:
        yield first
    while True:
        yield parallel.shard_batch(next(data_iter), mesh)


def train_epoch(train_fn_at, state, batches, *, step, epoch, num_epochs, epoch_start, epoch_end, config, logger,
                 save, should_save, check_metrics, should_stop, profiler=None, max_in_flight=None):
    """Runs the steps ``[step, epoch_end)`` of one epoch with a progress bar.

    Metrics stay on device. At each ``log_every_steps`` boundary their host copies are
    started (``copy_to_host_async``) and the *previous* interval's, long finished, are
    fetched, checked (``check_metrics(rows, first_step)`` raises on NaN/inf), logged and shown
    as the running loss and images/s: the host never waits for the step it has just
    dispatched, so the device is not left idle while the host logs. Before a periodic
    checkpoint (``save(state, step)`` on the steps ``should_save`` names), at the epoch's end
    (saved by the caller) and on a stop, every outstanding interval is fetched and checked
    first, so no unchecked state is saved. ``should_stop(step)`` is asked before every step;
    ``profiler`` (a :class:`~flax_resnet.training.profiling.StepProfiler`) traces the steps it names.
    At most ``max_in_flight`` steps are dispatched but unfinished (0: no bound; default
    :func:`flax_resnet.cpu.steps_in_flight`: on XLA:CPU 1, each step waiting for the last), the
    wait coming after the step's batch is fetched, so each step's host buffers are bounded.
    Returns ``(state, step reached, fetched metric rows, images/s per log interval, stopped)``.
    """
    log_every = max(int(config.log_every_steps), 1)
    bar = run_logging.Progress(epoch_end - epoch_start, initial=step - epoch_start,
                               desc=f"epoch {epoch + 1}/{num_epochs}")
    pending, rows, rates, meter = [], [], [], run_logging.Throughput()
    in_flight, in_flight_step = [], step  # the last interval: host copies started, fetched at the next boundary

    def flush(interval, last_step):
        fetched = jax.device_get(interval)
        check_metrics(fetched, last_step - len(fetched) + 1)
        meter.add(config.batch_size * len(fetched))
        rate = meter.mark()
        rates.append(rate)
        rows.extend(fetched)
        logger.log("train", last_step, {"epoch": epoch + 1, **run_logging.mean_metrics(fetched), "images_per_sec": rate})
        return {"loss": f"{run_logging.mean_metrics(rows)['loss']:.4f}", "img/s": f"{rate:.0f}"}

    def flush_all():
        nonlocal pending, in_flight
        postfix = flush(in_flight, in_flight_step) if in_flight else {}
        postfix = flush(pending, step) if pending else postfix
        pending, in_flight = [], []
        return postfix

    def rotate():
        nonlocal pending, in_flight, in_flight_step
        postfix = flush(in_flight, in_flight_step) if in_flight else {}
        for metrics in pending:
            for value in metrics.values():
                value.copy_to_host_async()
        pending, in_flight, in_flight_step = [], pending, step
        return postfix

    stopped = False
    window = cpu.StepWindow(cpu.steps_in_flight() if max_in_flight is None else max_in_flight)
    try:
        while step < epoch_end:
            if should_stop(step):
                stopped = True
                break
            batch = next(batches)
            window.wait()
            if profiler is None:
                state, metrics = train_fn_at(step)(state, batch)
            else:
                with profiler.step(step):
                    state, metrics = train_fn_at(step)(state, batch)
                profiler.after(step + 1, state)
            step += 1
            window.add(metrics)
            pending.append(metrics)
            save_now = step != epoch_end and should_save(step)
            if step == epoch_end or save_now:
                postfix = flush_all()
            else:
                postfix = rotate() if step % log_every == 0 else {}
            bar.update(1, **postfix)
            if save_now:
                save(state, step)
        flush_all()  # stopped between two log intervals
    finally:
        bar.close()  # before any error message is printed
    return state, step, rows, rates, stopped


def report_epoch(say, logger, step, epoch, num_epochs, train_rows, ev, elapsed):
    """The per-epoch ``eval`` record in metrics.jsonl/TensorBoard and the printed line."""
    train = run_logging.mean_metrics(train_rows)
    record = {"epoch": epoch, "train_loss": train.get("loss"), "train_top1": train.get("top1"),
              "test_loss": ev["loss"], "test_top1": ev["top1"], "test_count": ev["count"], "elapsed_s": elapsed}
    if "top5" in ev:
        record["test_top5"] = ev["top5"]
    if "ema" in ev:  # the weights' exponential moving average, evaluated beside them
        record.update({"ema_test_loss": ev["ema"]["loss"], "ema_test_top1": ev["ema"]["top1"]})
    logger.log("eval", step, record)
    say(f"epoch {epoch}/{num_epochs}  step {step}  train loss {train.get('loss', float('nan')):.4f}  "
        f"test loss {ev['loss']:.4f}  test top-1 {100 * ev['top1']:.2f}%"
        + (f"  top-5 {100 * ev['top5']:.2f}%" if "top5" in ev else "")
        + (f"  EMA top-1 {100 * ev['ema']['top1']:.2f}%" if "ema" in ev else "") + f"  ({ev['count']} images)")
    return record
