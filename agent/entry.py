"""The `node-health` executable: `scan` goes straight to its lean parser, the rest to typer.

A scan's time is mostly start-up, and typer (with the pydantic it brings) is most of that;
see benchmarks/kernel_log.py.

Exit status 1 means "take the node out": an error of our own must never look like it. Any
exception that reaches this far is one line on stderr and status 2 (could not judge).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

EARLY_SIGNALS: list[int] = []  # a stop asked for before the daemon could listen


def main() -> None:
    try:
        _main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # whatever it is (a CancelledError too), it is no verdict
        quiet_stdout()
        sys.stderr.write(f"node-health: {describe(exc)}\n")
        sys.exit(2)
    finally:
        try:
            sys.stdout.flush()
        except OSError as exc:  # what was printed is lost (a closed pipe, a full disk)
            quiet_stdout()
            sys.stderr.write(f"node-health: cannot write output: {exc.strerror}\n")
            sys.exit(2)


def describe(exc: BaseException) -> str:
    """One line for an exception nobody handled: what it was, and where (for a bug report)."""
    if isinstance(exc, OSError) and _output_lost(exc):
        return f"cannot write output: {exc.strerror}"
    import traceback  # here: start-up, before the signal handlers, must stay short
    from pathlib import Path

    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"internal error: {what}{where}"[:1000]


def _output_lost(exc: OSError) -> bool:
    return exc.filename is None and exc.errno in (errno.EPIPE, errno.ENOSPC)


def quiet_stdout() -> None:
    """Stdout that can no longer be written (a closed pipe, a full disk): point it at
    /dev/null, so that the interpreter's own flush at exit does not fail once more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _main() -> None:
    if sys.argv[1:2] == ["run"] and "--once" not in sys.argv:
        # Start-up takes a while (imports); a SIGTERM in that time must still stop the agent
        # cleanly, not kill it. The daemon takes over these handlers once it runs.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: EARLY_SIGNALS.append(signum))
    if sys.argv[1:2] == ["scan"]:
        from agent.scan import main as scan_main

        sys.exit(scan_main(sys.argv[2:]))
    from agent.cli import main as cli_main

    cli_main()
