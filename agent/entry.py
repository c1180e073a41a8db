"""The `node-health` executable: `scan` goes straight to its lean parser, the rest to typer.

A scan's time is mostly start-up, and typer (with the pydantic it brings) is most of that;
see benchmarks/kernel_log.py.
"""

from __future__ import annotations

import signal
import sys

EARLY_SIGNALS: list[int] = []  # a stop asked for before the daemon could listen


def main() -> None:
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
