"""Where a study lives: a SQLite file in the sweep's workdir, or any SQLAlchemy URL Optuna accepts.

Both are Optuna ``RDBStorage`` with heartbeats: a running trial records a heartbeat every
``heartbeat_interval`` seconds, and a trial whose heartbeat is older than ``grace_period`` (its
worker was killed, its machine lost) is marked FAIL by the next worker that starts a trial or
polls the study; that worker's stale-trial callback re-queues it as a WAITING trial with the same
parameters (and its reported epochs), which the next free worker runs. See
:mod:`flax_resnet.sweep.study` for how a retry resumes from the failed trial's checkpoint.

A URL that cannot be opened (unreachable server, bad credentials, missing driver, malformed URL)
is a one-line :class:`~flax_resnet.errors.UserError`.
"""

from __future__ import annotations

import importlib.util
import random
import time
import warnings
from pathlib import Path

from flax_resnet.errors import UserError
from flax_resnet.sweep.optional import INSTALL_HINT, require_optuna

STUDY_DB = "study.db"
MAX_RETRIES = 3  # times one trial's parameters are re-queued after its worker died
CONNECT_TIMEOUT_S = 10
OPEN_ATTEMPTS = 4  # workers started together race to create the tables


def default_url(workdir: str | Path) -> str:
    """The SQLite file in the sweep's workdir."""
    return f"sqlite:///{(Path(workdir) / STUDY_DB).resolve()}"


def _with_driver(url: str) -> str:
    """``postgresql://`` names no driver; SQLAlchemy 2.1 then picks psycopg 3, ours is psycopg2-binary.

    A URL naming a driver (``postgresql+psycopg://``) is left alone; ``postgres://`` (Heroku's
    spelling, refused by SQLAlchemy) means ``postgresql://``.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        driver = "psycopg2" if importlib.util.find_spec("psycopg2") is not None else None
        if driver is None and importlib.util.find_spec("psycopg") is None:
            raise UserError(f"storage {redact(url)}: no PostgreSQL driver is installed; {INSTALL_HINT} "
                            f"(psycopg2-binary)")
        return f"postgresql{'+' + driver if driver else ''}://{rest}"
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"
    return url


def _retry_callback(optuna):
    """Re-queues a stale trial with its parameters and reported values (renamed in optuna 4.9)."""
    storages = optuna.storages
    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
    if cls is not None:
        return "heartbeat_stale_trial_callback", cls(max_retry=MAX_RETRIES, inherit_intermediate_values=True)
    return "failed_trial_callback", storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES,
                                                                      inherit_intermediate_values=True)


def open_storage(url: str | None, workdir: str | Path, *, heartbeat_interval: int = 30, grace_period: int = 120):
    """An Optuna ``RDBStorage`` for ``url`` (default: SQLite in ``workdir``) with heartbeats on.

    Raises:
      UserError: the storage cannot be opened, in one line naming the URL (password hidden).
    """
    optuna = require_optuna()
    url = _with_driver(url or default_url(workdir))
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    shown = redact(url)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeats and the retry callback are marked experimental
                key, callback = _retry_callback(optuna)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  **{key: callback})
        except ImportError as e:
            raise UserError(f"storage {shown}: its database driver is not installed ({_cause(e)}); for "
                            f"PostgreSQL: {INSTALL_HINT} (psycopg2-binary)") from None
        except Exception as e:  # noqa: BLE001  # SQLAlchemy's OperationalError, ArgumentError, ...
            if attempt + 1 < OPEN_ATTEMPTS and _lost_a_race(e):
                time.sleep(0.5 + random.random())  # another worker is creating the tables: they exist next time
                continue
            raise UserError(f"storage {shown} cannot be opened ({type(e).__name__}: {_cause(e)}); check that "
                            f"the server is running and the URL (dialect://user:password@host:port/db) is right, "
                            f"or leave --storage out for a SQLite file in the workdir") from None


def _lost_a_race(e: BaseException) -> bool:
    """Workers starting together on a fresh database all create Optuna's tables; all but one collide."""
    text = str(e).lower()
    return type(e).__name__ == "IntegrityError" or any(
        words in text for words in ("already exists", "duplicate key", "database is locked"))


def _cause(e: BaseException) -> str:
    """The first meaningful line of a (SQLAlchemy-wrapped) database error."""
    inner = getattr(e, "orig", None) or e.__cause__ or e
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return (lines[0] if lines else type(inner).__name__)[:200]


def requeue(study, trial) -> None:
    """Re-queues a FAIL trial as the heartbeat's stale-trial callback would (a worker stopped it cleanly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, callback = _retry_callback(require_optuna())
        callback(study, trial)
