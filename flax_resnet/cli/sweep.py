"""``sweep``: hyperparameter search over a recipe with Optuna (the ``[sweep]`` extra)."""

from __future__ import annotations

from flax_resnet.cli.commands import EXIT_PREEMPTED


def _add_sweep(sub):
    p = sub.add_parser(
        "sweep", help="hyperparameter search with Optuna (TPE, pruning, resumable; SQLite or PostgreSQL)",
        description="Search the fields of a space file (YAML, one field per line, e.g. "
                    "learning_rate: {distribution: loguniform, low: 0.01, high: 0.5}; also uniform, "
                    "int with low/high/step, categorical with choices) over a recipe. Each trial is a "
                    "training run in WORKDIR/trial_<n>/; poor trials are pruned after an epoch. Rerun "
                    "the same command to continue the study; run it on several machines with one "
                    "--storage to share the work. Writes trials.csv/.md, history.png, importance.png "
                    "and best_config.py (flax-resnet train --config WORKDIR/best_config.py). Override "
                    "any config field with --config.FIELD=VALUE.")
    p.add_argument("--config", default=None, metavar="NAME|PATH", help="the recipe to search over (default "
                   "digits_resnet20) or a path to a .py file")
    p.add_argument("--space", required=True, metavar="FILE", help="the search space (YAML)")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="finished (complete or pruned) trials the study should hold, counting earlier runs "
                        "and other workers")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default <config>_<space>)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="SQLAlchemy URL, e.g. postgresql://user:password@host/db (default: sqlite "
                        "WORKDIR/study.db)")
    p.add_argument("--workdir", default=None, help="trial runs and report (default runs/sweep_<study>); "
                   "shared storage when several machines run trials, so a retry finds its checkpoints")
    p.add_argument("--pruner", default="median", choices=("median", "halving", "none"),
                   help="median (default: below the median at an epoch, once 3 trials have finished, from "
                        "half-way through the epochs), successive halving, or none")
    p.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed (default 0)")
    p.add_argument("--heartbeat-interval", "--heartbeat_interval", dest="heartbeat_interval", type=int, default=30,
                   metavar="S", help="seconds between a running trial's heartbeats (default 30)")
    p.add_argument("--grace-period", "--grace_period", dest="grace_period", type=int, default=120, metavar="S",
                   help="seconds without a heartbeat after which a trial is failed and retried (default 120)")
    p.set_defaults(func=_cmd_sweep, accepts_overrides=True)


def _cmd_sweep(args):
    from pathlib import Path

    from flax_resnet import parallel
    from flax_resnet.configs import DEFAULT_CONFIG, load_config
    from flax_resnet.sweep import load_space, require_optuna, run_sweep
    from flax_resnet.sweep.space import describe

    require_optuna()  # before anything else: the one-line install hint
    name = args.config or DEFAULT_CONFIG
    config = load_config(name, args.overrides)
    space = load_space(args.space, config)
    study = args.study or f"{Path(name).stem}_{Path(args.space).stem}"
    workdir = args.workdir or str(Path("runs") / f"sweep_{study}")
    parallel.enable_compilation_cache()  # trials differing only in a few constants share compiles
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"study {study}: {args.trials} trials of {name} over\n{describe(space)}")
    result = run_sweep(config, space, n_trials=args.trials, workdir=workdir, study_name=study,
                       storage_url=args.storage, pruner=args.pruner, seed=args.seed,
                       heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                       base_config=name, say=say)
    print(result.table)
    if result.best is not None:
        b = result.best
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items())
        print(f"best: trial {b['number']}, test top-1 {100 * b['value']:.2f}% ({shown})")
        print(f"run it again: flax-resnet train --config {Path(workdir) / 'best_config.py'}")
    print(f"{result.finished} of {args.trials} trials finished ({result.ran_here} run here); outputs in {workdir}: "
          + ", ".join(Path(f).name for f in result.files))
    if result.preempted:
        print("stopped by a signal: the running trial is queued again; rerun the same command to resume it")
        return EXIT_PREEMPTED
    return 0


SUBCOMMANDS: list = [_add_sweep]
