"""The ``cdam`` command: ``explain`` a dataset, run the offline ``demo``, ``verify`` an output, and the
commands that read a finished run (one thin module each in ``jobs/``, listed in ``READING_COMMANDS``).

A command's module defines ``add_parser(commands)``, which adds its subparser and sets ``handler`` to a
function ``(args) -> exit status``; it imports its library code inside that function, so ``cdam --help``
stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from typing import Iterator

JOB_COMMANDS = ("explain", "demo")
"""Modules of ``jobs/`` whose commands run the explain job."""
READING_COMMANDS = ("query", "audit", "serve", "report", "show", "export_fiftyone", "derive", "evaluate")
"""Modules of ``jobs/`` whose commands read a finished run through ``cdam_worker.reading.open_run``."""
TOOL_COMMANDS = ("pack",)
"""Modules of ``jobs/`` with other commands (same ``add_parser`` protocol) that do not read a run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdam", description="Class-Discriminative Attention Maps (CDAM) for whole image datasets with timm ViTs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in JOB_COMMANDS:
        importlib.import_module(f"jobs.{name}").add_parser(commands)
    verify = commands.add_parser(
        "verify",
        help="check a finished output",
        description="Check that every shard has a marker, counts agree with the manifest, checksums match, and every metadata row's Zarr data is written.",
    )
    verify.add_argument("output", metavar="DEST", help="output folder or s3://bucket/prefix")
    verify.set_defaults(handler=_verify)

    for name in READING_COMMANDS + TOOL_COMMANDS:
        importlib.import_module(f"jobs.{name}").add_parser(commands)
    parser.set_defaults(started_at=None)  # when the command's process started, if it is the whole process
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``cdam`` program (``argv`` None: ``sys.argv``, the whole process is this command) or one command
    run in-process (``argv`` given); returns the exit status."""
    args = build_parser().parse_args(argv)
    if argv is None:  # cdam explain reports the process's start-up (Python and imports) as a phase
        import psutil

        args.started_at = psutil.Process().create_time()
    got_sigterm = threading.Event()
    try:
        with _sigterm_as_interrupt(got_sigterm):
            return args.handler(args)
    except Exception as error:
        if not isinstance(error, _one_line_errors()):
            raise
        from cdam_worker.storage import redact

        print(f"cdam {args.command}: error: {redact(str(error)).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the lock is released, finished shards kept
        terminated = got_sigterm.is_set()
        resume = (
            "; shards finished so far are kept: rerun the same command to resume" if args.command == "explain" else ""
        )
        print(f"cdam {args.command}: stopped by {'SIGTERM' if terminated else 'SIGINT'}{resume}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


ONE_LINE_ERRORS = (
    ("cdam_worker.pipeline.plan", "ConfigError"),
    ("cdam_worker.shards.specs", "DataError"),
    ("cdam_worker.maps.model", "ModelLoadError"),
    ("cdam_worker.storage", "StorageError"),
    ("cdam_worker.output_lock", "OutputInUseError"),
    ("cdam_worker.output_lock", "OutputLockLost"),
    ("cdam_worker.pipeline.actor_pool", "JobError"),
    ("cdam_worker.reading.run", "RunError"),
)
"""The errors a command reports as one line (bad input, a refused output, a job that cannot go on), by module."""


def _one_line_errors() -> tuple[type[Exception], ...]:
    """Those of ``ONE_LINE_ERRORS`` whose module was imported: an error of a module never imported cannot have
    been raised, and importing them all would cost every command torch and Ray (``cdam query`` needs neither)."""
    return tuple(getattr(sys.modules[module], name) for module, name in ONE_LINE_ERRORS if module in sys.modules)


@contextlib.contextmanager
def _sigterm_as_interrupt(got_sigterm: threading.Event) -> Iterator[None]:
    """SIGTERM (``ray job stop``, a scheduler) raises KeyboardInterrupt, so the job cleans up as on Ctrl-C.

    ``got_sigterm`` tells the two apart afterwards: a handler's exception raised inside a blocking Ray
    call comes back as a plain KeyboardInterrupt, so the exception type cannot.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def terminate(_signum: int, _frame: object) -> None:
        got_sigterm.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _verify(args: argparse.Namespace) -> int:
    """``cdam verify DEST``: list what is wrong with the output, if anything."""
    from jobs.verify import verify_output

    problems = verify_output(args.output)
    for problem in problems:
        print(problem)
    print(f"{'FAILED' if problems else 'OK'}: {len(problems)} problem(s) in {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
