"""The kernel-log check: follow the kernel log and report what the rules find, live.

Source `auto` takes /dev/kmsg where it can be opened (not as a non-root user, nor without
CAP_SYSLOG under `kernel.dmesg_restrict=1`), else the journal where journalctl and the host's
journal files are there, else the first log file that exists, and says once which, and why
the ones before it were passed over. At start it reads what the source holds since boot, so a
fault from before the agent started is seen. Each finding carries where its record ends; the
agent commits that place in one write with the finding's events (`checkpoint`), and a copy
is kept under the state directory, so a restart, even after a `kill -9`, reports each record
once. Run on its own (no agent), the check keeps its place itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel

from checks.api import Finding, Status, StreamingCheck, move_aside
from checks.kernel_log.classifier import Classifier
from checks.kernel_log.formats import from_kernel
from checks.kernel_log.options import KernelLogOptions, ruleset
from checks.kernel_log.sources import (
    Chunk,
    FileSource,
    Gap,
    JournalSource,
    KmsgSource,
    SourceError,
)

log = structlog.get_logger("checks.kernel_log")
STATE_FILE = "kernel-log.json"


class KernelLogCheck(StreamingCheck):
    name = "kernel_log"
    description = "kernel log rules: XID/SXid, Neuron, hung tasks, OOM, filesystems, I/O, MCE, AER"
    Options: ClassVar[type[BaseModel]] = KernelLogOptions

    def __init__(self, ctx: Any, options: BaseModel | None = None) -> None:
        super().__init__(ctx, options)
        opts: KernelLogOptions = self.options  # type: ignore[assignment]
        self.rules = ruleset(opts)  # a bad rule is a configuration error, found at start
        self._said_source = False
        self._passed_over: dict[str, str] = {}  # source: why `auto` did not take it
        self._agent_commits = False  # the agent commits our place with its events (resume)
        self._resumed: dict[str, Any] | None = None  # the last checkpoint the agent committed
        self._kind: str | None = None
        self._state: dict[str, Any] = {}  # of the stream being followed

    def missing(self) -> list[str]:
        opts: KernelLogOptions = self.options  # type: ignore[assignment]
        if opts.source == "auto" and self._pick(opts) is None:
            why = [*self._passed_over.values(), f"none of {', '.join(opts.files)}"]
            return [f"no kernel log source ({'; '.join(why)})"]
        return []

    def _pick(self, opts: KernelLogOptions) -> str | None:
        if opts.source != "auto":
            return opts.source  # whatever is wrong with it, opening it will say
        self._passed_over = {}
        kmsg = self.ctx.path(opts.kmsg_path)
        try:  # permission is the kernel's to say at open (dmesg_restrict), not the mode's
            os.close(os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK))
            return "kmsg"
        except OSError as exc:
            self._passed_over["kmsg"] = f"{kmsg}: {exc.strerror}"
        if shutil.which(opts.journalctl) is None:
            self._passed_over["journal"] = f"{opts.journalctl} not found"
        elif (unread := self._journal_unreadable()) is not None:
            self._passed_over["journal"] = unread
        else:
            return "journal"
        return "file" if self._first_file(opts) is not None else None

    def _journal_unreadable(self) -> str | None:
        """Why the host's journal (persistent or volatile, one directory per machine id)
        cannot be read, or None. journalctl -b fails on an empty or absent one, and prints
        nothing, successfully, where it may open none of the files (the journal's ACL gives
        group adm read; a pod without it): that would read as a quiet kernel, so a file must
        open for us before the journal is taken. Only the system journal's files count
        (system.journal, system@....journal): journald keeps the kernel's records there, and
        gives each user read access to their own user-UID.journal (journalctl(1)), so the
        pod's uid, the host's first user's, may open one that holds none."""
        dirs = (self.ctx.path("/var/log/journal"), self.ctx.path("/run/log/journal"))
        files = [f for d in dirs for f in d.glob("*/system*.journal")]
        if not files:
            return "no journal files under the host root"
        why = ""
        for file in files:
            try:
                os.close(os.open(file, os.O_RDONLY | os.O_NONBLOCK))
                return None
            except OSError as exc:
                why = why or f"{file}: {exc.strerror}"
        return f"no journal file can be read ({why})"

    def _first_file(self, opts: KernelLogOptions) -> Path | None:
        return next((p for f in opts.files if (p := self.ctx.path(f)).is_file()), None)

    async def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        opts: KernelLogOptions = self.options  # type: ignore[assignment]
        kind = self._pick(opts)
        if kind is None:
            raise SourceError(self.missing()[0])
        # A one-off run (follow=False) reports everything since boot and remembers nothing.
        state = self._load_state() if follow else {}
        if follow and self._resumed is not None:
            state = max(state, self._resumed, key=lambda s: s.get("commit", 0))
        boot_id = self._boot_id()
        if state.get("boot_id") != boot_id:
            state = {"boot_id": boot_id, "commit": state.get("commit", 0)}
        if follow:
            self._kind, self._state = kind, state
        source = self._source(kind, opts, state)
        if not self._said_source:
            log.info(
                "kernel_log_source",
                source=kind,
                passed_over=self._passed_over or None,
                engine=self._classifier().engine_name,
            )
            self._said_source = True
        classifier = self._classifier()
        async for item in source.items(follow):
            # A backlog (a boot's worth of records, a burst) is read without waiting for the
            # source: hand the loop a turn between items, or a SIGTERM waits for the backlog.
            await asyncio.sleep(0)
            if isinstance(item, Gap):
                yield Finding(
                    "kmsg",
                    "KernelLogGap",
                    Status.UNKNOWN,
                    "RecordsLost",
                    f"{item.lost} kernel log records were overwritten before they could be read",
                    evidence={"lost": item.lost},
                    temporary=True,
                )
                continue
            found = (
                [  # a log file: what other programs wrote in it is not the kernel's
                    replace(f, position=item.at(end))
                    for text, end in classifier.candidate_spans(item.data)
                    if from_kernel(text) and (f := classifier.record(text))
                ]
                if isinstance(item, Chunk)
                else [replace(f, position=item.position)]
                if (f := classifier.record(item.text, item.when))
                else []
            )
            for finding in found:
                yield finding
            if found and follow and not self._agent_commits:
                self._advance(kind, state, item.position)
                self._write_state(state)

    def resume(self, state: Mapping[str, Any] | None) -> None:
        self._agent_commits = True
        self._resumed = dict(state) if state else None

    def checkpoint(self, position: Mapping[str, Any]) -> dict[str, Any] | None:
        if self._kind is None:
            return None
        state = json.loads(json.dumps(self._state))  # a copy: the last one may be in flight
        self._advance(self._kind, state, position)
        state["commit"] = state.get("commit", 0) + 1
        self._state = self._resumed = state  # a restarted stream resumes here
        return state

    def committed(self, state: Mapping[str, Any]) -> None:
        self._write_state(state)

    def _classifier(self) -> Classifier:
        opts: KernelLogOptions = self.options  # type: ignore[assignment]
        return Classifier(self.rules, engine=opts.engine, boot_time=self._boot_time())

    def _source(self, kind: str, opts: KernelLogOptions, state: dict[str, Any]) -> Any:
        if kind == "kmsg":
            return KmsgSource(
                self.ctx.path(opts.kmsg_path), state.get("kmsg_seq"), self._boot_time()
            )
        if kind == "journal":
            return JournalSource(opts.journalctl, state.get("journal_cursor"), self.ctx.host_root)
        path = self._first_file(opts) or self.ctx.path(opts.files[0])
        pos = state.get("files", {}).get(str(path), {})
        return FileSource(path, pos.get("inode"), pos.get("offset", 0))

    def _advance(self, kind: str, state: dict[str, Any], position: Mapping[str, Any]) -> None:
        if kind == "kmsg":
            state["kmsg_seq"] = position["seq"]
        elif kind == "journal" and position.get("cursor"):
            state["journal_cursor"] = position["cursor"]
        elif kind == "file":
            opts: KernelLogOptions = self.options  # type: ignore[assignment]
            state.setdefault("files", {})[str(self._first_file(opts))] = dict(position)

    def _write_state(self, state: Mapping[str, Any]) -> None:
        path = self._state_path()
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def _load_state(self) -> dict[str, Any]:
        """The saved positions. A file that is not a state of ours (bad JSON, wrong types, a
        directory in its place) is moved aside with a warning and reading starts afresh
        from boot: kept, it would fail this check at every start."""
        if self.ctx.state_dir is None:
            return {}
        path = self.ctx.state_dir / STATE_FILE
        try:
            return _valid_state(json.loads(path.read_text()))
        except FileNotFoundError:
            return {}
        except NotADirectoryError:  # the state directory is not one: agent.statedir says so
            return {}
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            moved = move_aside(path)
            log.warning(
                "kernel_log_state_unreadable",
                path=str(path),
                error=str(exc)[:200],
                moved_to=str(moved) if moved else None,
            )
            return {}

    def _state_path(self) -> Path | None:
        if self.ctx.state_dir is None:
            return None
        self.ctx.state_dir.mkdir(parents=True, exist_ok=True)
        return self.ctx.state_dir / STATE_FILE

    def _boot_id(self) -> str | None:
        try:
            return self.ctx.path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None

    def _boot_time(self) -> float | None:
        """Unix time of boot (`btime` in /proc/stat), to date records timed since boot."""
        try:
            for line in self.ctx.path("/proc/stat").read_text().splitlines():
                if line.startswith("btime "):
                    return float(line.split()[1])
        except (OSError, ValueError):
            pass
        return None


def _valid_state(state: Any) -> dict[str, Any]:
    """`state` if the keys this check reads have the types it wrote; TypeError otherwise."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(state, dict):
        raise TypeError("not an object")
    files = state.get("files", {})
    checks = {
        "boot_id": state.get("boot_id") is None or isinstance(state["boot_id"], str),
        "kmsg_seq": "kmsg_seq" not in state or count(state["kmsg_seq"]),
        "journal_cursor": isinstance(state.get("journal_cursor", ""), str),
        "files": isinstance(files, dict)
        and all(
            isinstance(pos, dict)
            and (pos.get("inode") is None or count(pos["inode"]))
            and count(pos.get("offset", 0))
            for pos in files.values()
        ),
    }
    if bad := [key for key, ok in checks.items() if not ok]:
        raise TypeError(f"{', '.join(bad)} of the wrong type")
    return state
