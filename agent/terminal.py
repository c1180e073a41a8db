"""How the command line writes for a person: colour only where it is wanted, tables by rich.

rich is imported here, in the commands that print a table, never by the daemon: its import
would count in the agent's resident memory (benchmarks/footprint.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from typing import TextIO


def color(choice: str = "auto", stream: TextIO | None = None) -> bool:
    """`on`/`off` as asked; `auto`: on a terminal, unless NO_COLOR is set and not empty
    (no-color.org: a flag the user gives wins over it)."""
    if choice in ("on", "off"):
        return choice == "on"
    stream = sys.stdout if stream is None else stream
    return stream.isatty() and not os.environ.get("NO_COLOR")


def table(heads: Sequence[str], rows: Sequence[Sequence[str]], stream: TextIO | None = None) -> str:
    """Columns under their heads, kubectl-like (no borders, two spaces apart). On a terminal
    at its width, long cells wrapped and heads bold (unless NO_COLOR); piped, never wrapped,
    so that each row stays one line for grep and awk."""
    import io

    from rich.console import Console
    from rich.table import Table

    stream = sys.stdout if stream is None else stream
    tty, colored = stream.isatty(), color("auto", stream)
    grid = Table(
        *heads,
        box=None,
        show_edge=False,
        pad_edge=False,
        padding=(0, 2, 0, 0),
        header_style="bold" if colored else "",
    )
    for row in rows:
        grid.add_row(*row)
    out = io.StringIO()
    console = Console(
        file=out,
        width=shutil.get_terminal_size().columns if tty else 100_000,
        force_terminal=colored,
        no_color=not colored,
        highlight=False,
        emoji=False,
        markup=False,
    )
    console.print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
