"""flax_resnet.sweep and ``flax-resnet sweep``: the space file, pruning, SQLite and PostgreSQL studies.

The end-to-end sweeps train ResNet-8 on digits for 2 epochs of 11 steps. Their space searches
``seed`` and ``augment``, which change no compiled program, so every trial after the first
reuses the same executables (tests/conftest.py's persistent compilation cache); the value
ranges and kinds of distributions are covered by the space tests, which train nothing.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
yaml = pytest.importorskip("yaml")

from helpers import CliProcess, run_cli, saved_steps  # noqa: E402

from flax_resnet.configs import get_config, load_config  # noqa: E402
from flax_resnet.errors import UserError  # noqa: E402
from flax_resnet.sweep import epoch_reporter, load_space, parse_space  # noqa: E402

TRAIN_ARGS = ("--config.model=resnet8", "--config.num_epochs=2", "--config.batch_size=128",
              "--config.log_every_steps=11")
SPACE = "seed: {distribution: int, low: 0, high: 99}\naugment: {distribution: categorical, choices: [true, false]}\n"
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_argv(workdir, data_dir, space_file, trials, *extra) -> list[str]:
    return ["sweep", "--space", str(space_file), "--trials", str(trials), "--workdir", str(workdir), *TRAIN_ARGS,
            f"--config.data_dir={data_dir}", *extra]


def trials_of(workdir) -> list[dict]:
    with open(Path(workdir) / "trials.csv") as f:
        return list(csv.DictReader(f))


def evals(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails an in-process run that takes longer than ``seconds`` (a sweep waiting forever) instead of hanging."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- the space file
def test_the_example_space_file_parses():
    space = load_space(Path(__file__).parents[1] / "experiments/sweeps/digits_lr.yaml", get_config())
    assert list(space) == ["learning_rate", "weight_decay"]
    lr = space["learning_rate"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log and (lr.low, lr.high) == (0.01, 0.5)


def test_every_kind_of_distribution():
    raw = yaml.safe_load("momentum: {distribution: uniform, low: 0.8, high: 0.95, step: 0.05}\n"
                         "batch_size: {distribution: int, low: 32, high: 128, step: 32}\n"
                         "schedule: {distribution: categorical, choices: [cosine, step]}\n"
                         "label_smoothing: {distribution: categorical, choices: [0, 0.1]}\n")
    space = parse_space(raw, get_config())
    D = optuna.distributions
    assert space["momentum"] == D.FloatDistribution(0.8, 0.95, step=0.05)
    assert space["batch_size"] == D.IntDistribution(32, 128, step=32)
    assert space["schedule"] == D.CategoricalDistribution(["cosine", "step"])
    assert space["label_smoothing"] == D.CategoricalDistribution([0.0, 0.1])  # a float field's choices are floats


# Bad space files, each with words its one-line error must hold.
BAD_SPACES = {
    "a list": ("- learning_rate\n", "expected a mapping"),
    "misspelt field": ("learning_rat: {distribution: loguniform, low: 0.01, high: 0.5}\n", "did you mean learning_rate"),
    "misspelt kind": ("learning_rate: {distribution: logunifrom, low: 0.01, high: 0.5}\n", "did you mean loguniform"),
    "bare value": ("learning_rate: 0.1\n", "distribution: KIND"),
    "missing key": ("momentum: {distribution: uniform, low: 0.5}\n", "needs high"),
    "extra key": ("learning_rate: {distribution: loguniform, low: 0.01, high: 0.5, step: 1}\n", "takes no step"),
    "reversed range": ("momentum: {distribution: uniform, low: 0.9, high: 0.5}\n", "low <= high"),
    "log of zero": ("weight_decay: {distribution: loguniform, low: 0.0, high: 0.1}\n", "low > 0"),
    "yaml 1e-5 string": ("weight_decay: {distribution: loguniform, low: 1e-5, high: 1.0e-3}\n", "without a dot"),
    "uniform on int": ("batch_size: {distribution: uniform, low: 32, high: 128}\n", "use distribution: int"),
    "float int range": ("batch_size: {distribution: int, low: 32, high: 128.5}\n", "integer low/high/step"),
    "wrong choice type": ("schedule: {distribution: categorical, choices: [cosine, 3]}\n", "does not fit"),
    "refused value": ("learning_rate: {distribution: uniform, low: 0.0, high: 0.5}\n", "refused"),
    "refused choice": ("schedule: {distribution: categorical, choices: [cosine, linear]}\n", "refused"),
    "tuple field": ("lr_boundaries_epochs: {distribution: categorical, choices: [1]}\n", "scalar fields"),
    "not yaml": ("learning_rate: {distribution: loguniform, low: 0.01\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPACES))
def test_a_bad_space_file_is_a_one_line_user_error(name, tmp_path):
    text, words = BAD_SPACES[name]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_space(path, get_config())
    message = str(e.value)
    assert words in message and str(path) in message and "\n" not in message, message


def test_cli_bad_space_missing_optuna_and_unreachable_storage_exit_2(tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("no_such_field: {distribution: uniform, low: 0, high: 1}\n")
    rc, _, err = run_cli(["sweep", "--space", str(space), "--trials", "2", "--workdir", str(tmp_path / "w")])
    assert rc == 2 and "no such config field" in one_line_error(err)
    rc, _, err = run_cli(["sweep", "--space", str(tmp_path / "missing.yaml"), "--trials", "2"])
    assert rc == 2 and "cannot be read" in one_line_error(err)

    space.write_text(SPACE)
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://nobody:secret@127.0.0.1:{port}/nothing"
    rc, _, err = run_cli(["sweep", "--space", str(space), "--trials", "2", "--workdir", str(tmp_path / "w"),
                          "--storage", url])
    line = one_line_error(err)
    assert rc == 2 and "cannot be opened" in line and f"127.0.0.1:{port}" in line and "secret" not in line

    rc, _, err = run_cli(["sweep", "--space", str(space), "--trials", "2", "--workdir", str(tmp_path / "w"),
                          "--heartbeat-interval", "5", "--grace-period", "5"])
    assert rc == 2 and "longer grace period" in one_line_error(err)

    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # as if not installed
    rc, _, err = run_cli(["sweep", "--space", str(space), "--trials", "2", "--workdir", str(tmp_path / "w")])
    assert rc == 2 and "pip install 'flax-resnet[sweep]'" in one_line_error(err)


# --------------------------------------------------------------------------- pruning
def test_the_epoch_callback_reports_and_prunes():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    for epoch in (1, 2):
        good.report(0.9, epoch)
    study.tell(good, 0.9)
    trial, said = study.ask(), []
    callback = epoch_reporter(trial, said.append)
    with pytest.raises(optuna.TrialPruned):
        callback(1, {"test_top1": 0.1, "best_top1": 0.1})
    assert trial.user_attrs["note"] == "pruned at epoch 1" and "test top-1 10.00%" in said[0]
    better = study.ask()
    epoch_reporter(better, said.append)(1, {"test_top1": 0.95, "best_top1": 0.95})  # not pruned
    assert study.trials[better.number].intermediate_values == {1: 0.95}


# --------------------------------------------------------------------------- SQLite, end to end
@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, digits_data_dir):
    """A 3-trial SQLite sweep through the CLI, in this process: ``(workdir, space file, exit, stdout)``."""
    root = tmp_path_factory.mktemp("sweep")
    space = root / "space.yaml"
    space.write_text(SPACE)
    workdir = root / "sweep"
    rc, out, err = run_cli(sweep_argv(workdir, digits_data_dir, space, 3))
    assert rc == 0, err[-3000:]
    return workdir, space, out


def test_a_sweep_writes_the_table_plots_and_best_config(sweep_run, digits_data_dir):
    workdir, _, out = sweep_run
    rows = trials_of(workdir)
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows) and rows[0]["state"] == "COMPLETE"
    assert all(float(r["wall_s"]) > 0 and 0 <= float(r["best_top1"]) <= 1 for r in rows)
    assert "| trial | state | best top-1 % | seed | augment |" in out and "3 of 3 trials finished" in out
    assert "| trial | state |" in (workdir / "trials.md").read_text()
    for n in range(3):  # each trial is an ordinary run
        assert (workdir / f"trial_{n}" / "curves.png").is_file() and saved_steps(workdir / f"trial_{n}")
    assert (workdir / "history.png").read_bytes()[:8] == PNG
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert (workdir / "importance.png").exists() == (len(complete) >= 2)

    best = max(complete, key=lambda r: float(r["best_top1"]))
    assert f"best: trial {best['trial']}, test top-1 {100 * float(best['best_top1']):.2f}%" in out
    config = load_config(str(workdir / "best_config.py"))
    assert config.seed == int(best["seed"]) and str(config.augment) == best["augment"]
    assert config.model == "resnet8" and config.data_dir == str(digits_data_dir)
    trained = json.loads(json.dumps(load_config("digits_resnet20", [*TRAIN_ARGS, f"--config.data_dir={digits_data_dir}",
                                                                    f"--config.seed={best['seed']}",
                                                                    f"--config.augment={best['augment']}"]).to_dict()))
    assert json.loads(json.dumps(config.to_dict())) == trained
    assert max(r["test_top1"] for r in evals(workdir / f"trial_{best['trial']}")) == pytest.approx(
        float(best["best_top1"]))


def test_the_best_config_trains_again(sweep_run, tmp_path):
    workdir, _, _ = sweep_run
    rc, out, err = run_cli(["train", "--config", str(workdir / "best_config.py"), "--workdir", str(tmp_path / "again"),
                            "--config.num_train_steps=3"])
    assert rc == 0, err[-2000:]
    assert "model: resnet8" in out and "step 3" in out


def test_rerunning_continues_the_study(sweep_run, digits_data_dir, tmp_path):
    workdir, space, _ = sweep_run
    copy = tmp_path / "sweep"
    shutil.copytree(workdir, copy)
    rc, out, _ = run_cli(sweep_argv(copy, digits_data_dir, space, 3))
    assert rc == 0 and "3 of 3 trials finished (0 run here)" in out  # nothing left to do
    rc, out, err = run_cli(sweep_argv(copy, digits_data_dir, space, 3, "--config.learning_rate=0.3"))
    assert rc == 2 and "started with other config values (learning_rate)" in one_line_error(err)
    rc, out, err = run_cli(sweep_argv(copy, digits_data_dir, space, 3, "--study", "another"))
    assert rc == 2 and "holds the trials of study 'digits_resnet20_space'" in one_line_error(err)


def test_a_killed_worker_s_trial_fails_and_its_retry_resumes(sweep_run, digits_data_dir, tmp_path):
    """Kill -9 a worker mid-trial; the rerun fails the stale trial, retries it from its checkpoint."""
    workdir, space, _ = sweep_run
    copy = tmp_path / "sweep"
    shutil.copytree(workdir, copy)
    fast = ("--heartbeat-interval", "1", "--grace-period", "3", "--pruner", "none")  # trial 3 must reach epoch 2
    worker = CliProcess(sweep_argv(copy, digits_data_dir, space, 4, *fast), tmp_path, "worker")
    worker.wait_until(lambda: saved_steps(copy / "trial_3"), timeout=120)  # epoch 1 saved
    worker.kill()
    with deadline(180):
        rc, out, err = run_cli(sweep_argv(copy, digits_data_dir, space, 4, *fast))
    assert rc == 0, err[-3000:]
    rows = {r["trial"]: r for r in trials_of(copy)}
    assert rows["3"]["state"] == "FAIL" and rows["4"]["note"].startswith("retry of 3 (resumed)"), rows
    assert rows["4"]["state"] in ("COMPLETE", "PRUNED") and {rows[n]["seed"] for n in "34"} == {rows["3"]["seed"]}
    assert [rows[n]["state"] for n in "012"] == [r["state"] for r in trials_of(workdir)]  # not run again
    assert "4 of 4 trials finished (1 run here)" in out
    assert "resumed from" in (copy / "trial_4" / "train.log").read_text()
    assert "epoch 1/2" not in (copy / "trial_4" / "train.log").read_text().split("resumed from")[-1]


# --------------------------------------------------------------------------- PostgreSQL, two workers
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (a free port), as user postgres when run as root."""
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "pg_ctl").is_file():
        pytest.skip("PostgreSQL 15 binaries not installed")
    as_user = []
    base = Path(tempfile.mkdtemp(prefix="flax_resnet_pg_"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: initdb refuses root")
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"

    def pg(*argv):
        subprocess.run([*as_user, *map(str, argv)], check=True, capture_output=True, timeout=60)

    pg(PG_BIN / "initdb", "-D", data, "-U", "sweep", "--auth=trust", "--no-sync", "-E", "UTF8")
    pg(PG_BIN / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-o",
       f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql://sweep@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres, digits_data_dir, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    workdir = tmp_path / "sweep"
    argv = sweep_argv(workdir, digits_data_dir, space, 3, "--storage", postgres, "--study", "two_workers",
                      "--config.num_epochs=1")
    workers = [CliProcess(argv, tmp_path, f"worker{i}") for i in range(2)]
    for w in workers:
        assert w.wait(timeout=240) == 0, w.err[-3000:]
    # The CLI took postgresql:// (psycopg2, our driver); SQLAlchemy alone would pick psycopg 3.
    study = optuna.load_study(study_name="two_workers", storage=postgres.replace("postgresql:", "postgresql+psycopg2:"))
    S = optuna.trial.TrialState
    finished = [t for t in study.trials if t.state in (S.COMPLETE, S.PRUNED)]
    others = [t for t in study.trials if t not in finished]
    assert len(finished) == 3 and all(t.user_attrs.get("note") == "surplus" for t in others), study.trials
    assert len({t.params["seed"] for t in finished}) >= 2  # each worker samples, not one point repeated
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both worked
    for t in finished:  # each trained exactly once: one eval per epoch, never resumed
        epochs = [r["epoch"] for r in evals(workdir / f"trial_{t.number}")]
        assert epochs == list(range(1, len(t.intermediate_values) + 1)), (t.number, epochs)
        assert "resumed from" not in (workdir / f"trial_{t.number}" / "train.log").read_text()
    assert {r["trial"] for r in trials_of(workdir)} == {str(t.number) for t in study.trials}
    assert all("trials finished" in w.out for w in workers)
