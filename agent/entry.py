"""The `node-health` executable: `scan` goes straight to its lean parser, the rest to typer.

A scan's time is mostly start-up, and typer (with the pydantic it brings) is most of that;
see benchmarks/kernel_log.py.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["scan"]:
        from agent.scan import main as scan_main

        sys.exit(scan_main(sys.argv[2:]))
    from agent.cli import main as cli_main

    cli_main()
