"""One batch committed once: the policy's state, the hardware history and the events together.

A batch (what the daemon decides on one batch of findings) changes three files: the policy's
state (strike counts, the verdict), the hardware history (a fault that turned a condition on)
and the spool (its events, and where a streaming check resumes). A `kill -9` between two of
those writes left one batch reported but not counted (spooled, the source's position past it,
the state without it: the strikes and the decision lost), or counted twice (the history written,
the batch read again from the source).

The design, the simplest that holds: the policy's state file is the commit record. Its atomic
write carries the batch's number and an outbox, what the batch still has to write elsewhere:
its spool write (events and checkpoint lines, which carry the number too) and the history's new
text. It is written first; the history, the spool and the node's decision follow. At start, an
outbox whose batch the spool does not hold (the kill fell after the state's write) is written
again, the history before it is read and the events before anything else is spooled. So every
batch lands in all three or, killed before the state's write, in none, and is read again from
the source (stdout, MQTT and Kubernetes Events, sent at once, may see it twice: at least once
there); and a restart never writes back the node decision of before the batch. A state that
cannot be saved (a full disk) holds nothing back: the history and the events are written all
the same, the node decided.
Why not the others: the whole state in the spool's write would put every tracker in the
bounded spool once a batch; replaying the source from the position the state took in would
compare positions per source (kmsg sequence, journal cursor, file inode and offset) and fail
where the file has rotated since. Here nothing is compared but one number, and nothing replayed
but bytes already rendered. The cost: the batch's (coalesced) events written twice, in the
state file and the spool; the state is written once per batch either way, in a thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTBOX = "outbox"  # the policy state's key


@dataclass(frozen=True)
class Outbox:
    batch: int
    spool: bytes  # the batch's one spool write
    history: str | None  # the hardware history's text, when the batch changed it

    def saved(self) -> dict[str, Any]:
        """As the policy's state file holds it."""
        return {"batch": self.batch, "spool": self.spool.decode(), "history": self.history}


def saved_outbox(policy_state: Path) -> Outbox | None:
    """The outbox in the policy's saved state; None where there is none or the file is not one
    (the policy's own load says so, and moves it aside)."""
    try:
        raw = json.loads(policy_state.read_text())[OUTBOX]
        batch, spool, history = raw["batch"], raw["spool"], raw["history"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0):
        return None
    if not (isinstance(spool, str) and isinstance(history, str | None)):
        return None
    return Outbox(batch, spool.encode(), history)
