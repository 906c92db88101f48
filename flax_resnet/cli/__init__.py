"""The ``flax-resnet`` command line.

Each subcommand parses its flags, calls one library function and prints the result.
Logic lives in the package; this file only wires argparse to it.

Exit status: 0 done; 2 a user error (bad input, unreadable checkpoint, diverged training),
printed as one line without a traceback (``--debug`` shows it); 3 training stopped by
SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume); 4 an
unexpected error in a multi-process run (e.g. a collective failed because another process
died); 130 a second Ctrl-C (interrupted without saving). In a multi-process run only process
0 prints results; every process prints its own errors, prefixed ``[process I/N]``, and leaves
at once (without JAX's shutdown barrier), so the others notice within the heartbeat timeout.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback

from flax_resnet.cli import commands, deploy, sweep
from flax_resnet.cli.commands import EXIT_MULTIPROCESS_ERROR, EXIT_PREEMPTED, EXIT_USER_ERROR
from flax_resnet.errors import UserError

# --------------------------------------------------------------------------- main
_SUBCOMMANDS = [*commands.SUBCOMMANDS, *deploy.SUBCOMMANDS, *sweep.SUBCOMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flax-resnet", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    whole_process = argv is None  # the `flax-resnet` command itself, not a call from Python
    if whole_process:
        gc.disable()  # until the start-up imports are frozen (see _freeze_start_up)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from flax_resnet import cpu, data

    cpu.tune_host_allocator()  # first, before JAX starts its CPU threads (see its docstring)
    data.enable_worker_processes()  # Grain's workers read absl flags (--config.num_workers > 0)
    if whole_process:
        _freeze_start_up()
    try:
        status = args.func(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_process_tag()}{e}", file=sys.stderr)
        status = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{_process_tag()}interrupted", file=sys.stderr)
        status = 130
    except Exception as e:
        if not _multi_process():
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {_process_tag()}{_multi_process_error(e)}", file=sys.stderr)
        status = EXIT_MULTIPROCESS_ERROR
    status = int(status or 0)
    if status not in (0, EXIT_PREEMPTED) and _multi_process():
        _leave_now(status)
    if whole_process and getattr(args, "skip_teardown", False) and not _multi_process():
        _exit_after_atexit(status)
    return status


def _freeze_start_up() -> None:
    """Moves every object the imports made out of the cyclic garbage collector's reach, and turns it on.

    JAX, Flax, Orbax, Grain and TFDS leave hundreds of thousands of long-lived objects (modules,
    classes, functions) that each full collection traverses again: a tenth of a second or more
    per pass, several passes during the imports (collecting next to nothing) and more during
    training.
    Frozen objects are still freed by reference counting; a cycle among them is never collected,
    which for the process's own modules costs nothing. Only for the process's entry point: a
    caller of ``main(argv)`` keeps its collector as it was.
    """
    gc.freeze()
    gc.enable()


def _exit_after_atexit(status: int) -> None:
    """Ends the process once the ``atexit`` handlers have run, without the interpreter's teardown.

    For commands that close every file they write (``train``): tearing down the modules of JAX,
    XLA, Orbax and Grain (freeing each object, then the C++ runtimes) takes most of a second
    on 2 cores and writes nothing. A multi-process run exits normally (JAX's shutdown barrier).
    """
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    getattr(atexit, "_run_exitfuncs", lambda: None)()  # CPython's: what a normal exit runs first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _multi_process() -> bool:
    import jax

    return jax.distributed.is_initialized()


# Words in the errors JAX/gloo/Orbax raise when a collective or barrier loses a peer process.
_PEER_LOST = ("gloo", "connection reset", "connection closed", "socket closed", "heartbeat", "coordination service",
              "barrier")


def _multi_process_error(e: BaseException) -> str:
    """One line for an unexpected error in a multi-process run, naming the likely cause."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    what = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if any(word in str(e).lower() for word in _PEER_LOST):
        return (f"lost contact with another process of this run ({what}); it probably died or was killed: see its "
                f"log, then rerun the same command on every process to resume from the last checkpoint")
    return f"{what}; rerun with --debug for the traceback"


def _process_tag() -> str:
    """``[process I/N] `` in a multi-process run (every process prints its own errors), else nothing."""
    if not _multi_process():
        return ""
    import jax

    return f"[process {jax.process_index()}/{jax.process_count()}] "


def _leave_now(status: int) -> None:
    """Exits a failed multi-process run at once.

    A normal exit would wait (JAX's shutdown barrier, up to 5 minutes) for processes that may
    be blocked in a collective waiting for this one; leaving makes them fail within the
    heartbeat timeout instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

