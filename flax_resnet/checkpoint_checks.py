"""What a checkpoint's failures mean: damage, a read error that may pass, a full disk.

* Only damage (a missing commit marker or item, an unparsable or truncated file) makes
  :class:`~flax_resnet.checkpoint.Checkpointer` set a checkpoint aside (``*.corrupt``). A read
  error that may pass (permission denied, a file that vanished, out of memory, an unavailable
  file system) stops with a :class:`CheckpointReadError` and renames nothing: the same
  checkpoint may read fine once the cause is fixed.
* A save that fails for lack of space (``ENOSPC``, in Orbax's background thread) surfaces at the
  next save or wait as one :class:`DiskFullError` naming the directory, the space the checkpoint
  needs and what is free; the checkpoints already on disk stay as they are, and Orbax's own
  reports of it (logged tracebacks from its threads) are not repeated.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

from flax_resnet.errors import UserError

ITEMS = ("state", "data", "config", "meta")
COMMIT_FILE = "commit_success.txt"  # written into the step directory just before Orbax's final rename


class UnreadableCheckpointError(UserError):
    """A checkpoint exists but cannot be restored (damaged, or saved by an incompatible model)."""


class CheckpointReadError(UserError):
    """Reading a checkpoint failed for a reason that may pass (permissions, memory, a vanished file)."""


class DiskFullError(UserError):
    """A checkpoint could not be written: no space left on the device."""


# Read errors that say nothing about the checkpoint itself: the same files may read fine later.
_PASSING_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.EINTR,
                   errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EBUSY}
# The same in TensorStore's statuses (Orbax re-raises them as ValueError with the status in the text).
_PASSING_WORDS = ("PERMISSION_DENIED", "Permission denied", "NOT_FOUND", "No such file", "UNAVAILABLE",
                  "DEADLINE_EXCEEDED", "Out of memory", "Cannot allocate memory")
_FULL_WORDS = ("No space left on device", "os_error_code='28'")
METADATA_BYTES = 256 * 1024  # JSON items, Orbax's metadata and OCDBT manifests beside the arrays


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor), or None."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def passing_read_error(e: BaseException) -> str | None:
    """The cause, when ``e`` (raised while reading a checkpoint) may pass rather than mean damage."""
    for x in _chain(e):
        if isinstance(x, MemoryError):
            return "out of memory"
        if isinstance(x, OSError) and x.errno in _PASSING_ERRNOS:
            return f"{x.strerror or type(x).__name__}" + (f": {x.filename}" if x.filename else "")
        if any(word in str(x) for word in _PASSING_WORDS):
            return first_line(x)
    return None


def is_disk_full(e: BaseException) -> bool:
    return any((isinstance(x, OSError) and x.errno == errno.ENOSPC) or any(w in str(x) for w in _FULL_WORDS)
               for x in _chain(e))


class DropDiskFullReports(logging.Filter):
    """Orbax logs a save's ENOSPC from each of its threads; :class:`DiskFullError` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            return not is_disk_full(record.exc_info[1])
        return not any(w in text for w in _FULL_WORDS)


def first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def structural_problem(step_dir: str | Path, *, best: bool = False) -> str | None:
    """Why a finalised step directory cannot be a complete checkpoint, or ``None``.

    Cheap (no arrays read): the commit marker, every item directory, and that every JSON
    item parses. Array files are only checked by actually restoring them.
    """
    step_dir = Path(step_dir)
    if not (step_dir / COMMIT_FILE).is_file():
        return f"no {COMMIT_FILE}: the save did not finish"
    for item in ITEMS:
        if not (step_dir / item).is_dir():
            return f"item '{item}' is missing"
    json_files = [step_dir / item / "metadata" for item in ("data", "config", "meta")]
    if best:
        json_files.append(step_dir / "metrics" / "metrics")
    for path in json_files:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            if passing_read_error(e):
                raise CheckpointReadError(read_error_message(step_dir, e)) from e
            return f"{path.relative_to(step_dir)} is unreadable ({first_line(e, 80)})"
    return None


def read_error_message(step_dir: Path, e: BaseException) -> str:
    return (f"could not read checkpoint {step_dir} ({passing_read_error(e)}); nothing was changed: fix the cause "
            f"(permissions, memory, the file system) and rerun")
