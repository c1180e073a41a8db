"""The kernel-log check on live sources: a FIFO as /dev/kmsg, files, a fake journalctl."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import time
from pathlib import Path

import pytest
import structlog

from agent.metrics import Metrics
from agent.runner import Runner
from checks.api import Action, CheckContext, Finding, Status
from checks.kernel_log import sources
from checks.kernel_log.check import KernelLogCheck
from checks.kernel_log.options import KernelLogOptions
from tests.conftest import planned

KERNEL = Path(__file__).parent / "fixtures" / "kernel"
BIN = Path(__file__).parent / "bin"
XID79 = "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus."
XID13 = KERNEL / "faults" / "xid13-burst-gpud.log"


def kmsg_line(seq: int, message: str, usec: int = 0) -> str:
    """A record as /dev/kmsg gives it (Documentation/ABI/testing/dev-kmsg)."""
    return f"6,{seq},{usec},-;{message}\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def host(tmp_path: Path, boot_id: str = "boot-1") -> Path:
    root = tmp_path / "host"
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(boot_id + "\n")
    (root / "proc/stat").write_text("cpu  1 2 3 4\nbtime 1724280000\n")
    return root


def check(root: Path, tmp_path: Path, **options) -> KernelLogCheck:
    ctx = CheckContext(host_root=root, state_dir=tmp_path / "state")
    return KernelLogCheck(ctx, KernelLogOptions(**options))


async def collect(
    c: KernelLogCheck, follow: bool = False, limit: int | None = None, timeout: float = 5
) -> list[Finding]:
    """Findings until `limit`; then the stream is resumed once more, as the daemon does
    after handling a finding, which is when the check records its position."""
    out: list[Finding] = []
    stream = c.stream(follow=follow)

    async def run() -> None:
        async for f in stream:
            out.append(f)
            if limit is not None and len(out) >= limit:
                return

    await asyncio.wait_for(run(), timeout)
    if limit is not None:
        with contextlib.suppress(TimeoutError, StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 0.3)
    await stream.aclose()
    return out


async def test_a_line_in_kmsg_becomes_a_finding_within_100_ms(tmp_path) -> None:
    root = host(tmp_path)
    fifo = root / "dev/kmsg"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer that stays, like the kernel
    got: asyncio.Queue[tuple[float, Finding]] = asyncio.Queue()

    async def handle(findings: list[Finding]) -> None:
        for f in findings:
            got.put_nowait((time.perf_counter(), f))

    runner = Runner([planned(KernelLogCheck, CheckContext(host_root=root))], handle, Metrics())
    task = asyncio.create_task(runner.serve())
    await asyncio.sleep(0.2)  # the check is up and waiting on the FIFO
    latencies = []
    for seq in range(1, 6):
        start = time.perf_counter()
        os.write(writer, kmsg_line(seq, XID79.replace("b9", f"b{seq}"), seq * 10_000_000).encode())
        at, finding = await asyncio.wait_for(got.get(), 1)
        latencies.append(at - start)
        assert (finding.reason, finding.evidence["xid"]) == ("XidHardwareFailure", "79")
        assert finding.action is Action.REPLACE
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    os.close(writer)
    assert max(latencies) < 0.1, latencies


async def test_backlog_since_boot_is_read_and_a_restart_reports_nothing_twice(tmp_path) -> None:
    root = host(tmp_path)
    (root / "dev/kmsg").write_text(
        kmsg_line(1, "Linux version 6.8.0")
        + " SUBSYSTEM=pci\n"
        + kmsg_line(2, XID79, 5_000_000)
        + kmsg_line(3, "EXT4-fs (nvme0n1p1): mounted")
    )
    first = await collect(check(root, tmp_path), follow=True, limit=1)
    assert [(f.reason, f.evidence["xid"]) for f in first] == [("XidHardwareFailure", "79")]
    assert first[0].evidence["log_time"] == "2024-08-21T22:40:05Z"  # btime + 5 s
    append(root / "dev/kmsg", kmsg_line(4, XID79.replace("b9", "ba"), 9_000_000))
    again = await collect(check(root, tmp_path), follow=True, limit=1)
    assert [f.component for f in again] == ["gpu:0000:ba:00"]  # only the new one


@pytest.mark.parametrize(
    "saved",
    [
        "[]",
        '"boot-1"',
        '{"boot_id": "boot-1", "kmsg_seq": "2"}',
        '{"boot_id": "boot-1", "kmsg_seq": true}',
        '{"boot_id": ["boot-1"], "kmsg_seq": 2}',
        '{"boot_id": "boot-1", "files": []}',
        '{"boot_id": "boot-1", "files": {"/var/log/kern.log": {"offset": -1}}}',
        '{"boot_id": "boot-1", "journal_cursor": 5}',
        "[" * 100_000,
        None,  # a directory where the file should be
    ],
)
async def test_a_corrupt_state_is_moved_aside_and_reading_starts_afresh(
    tmp_path, saved: str | None
) -> None:
    from structlog.testing import capture_logs

    root = host(tmp_path)
    (root / "dev/kmsg").write_text(kmsg_line(1, "Linux version 6.8.0") + kmsg_line(2, XID79))
    path = tmp_path / "state" / "kernel-log.json"
    path.parent.mkdir()
    if saved is None:
        path.mkdir()
    else:
        path.write_text(saved)
    with capture_logs() as logs:
        found = await collect(check(root, tmp_path), follow=True, limit=1)
    assert [(f.reason, f.evidence["xid"]) for f in found] == [("XidHardwareFailure", "79")]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "kernel_log_state_unreadable"
    ]
    assert path.with_suffix(".corrupt").exists()
    assert json.loads(path.read_text())["kmsg_seq"] == 2  # and it is written afresh


async def test_a_new_boot_reads_its_own_log_from_the_start(tmp_path) -> None:
    root = host(tmp_path)
    (root / "dev/kmsg").write_text(kmsg_line(7, XID79))
    await collect(check(root, tmp_path), follow=True, limit=1)
    root = host(tmp_path, boot_id="boot-2")  # sequence numbers start again after a reboot
    assert len(await collect(check(root, tmp_path), follow=True, limit=1)) == 1


async def test_one_off_read_reports_everything_and_remembers_nothing(tmp_path) -> None:
    root = host(tmp_path)
    (root / "dev/kmsg").write_text(kmsg_line(1, XID79))
    for _ in range(2):
        assert len(await collect(check(root, tmp_path))) == 1
    assert not (tmp_path / "state" / "kernel-log.json").exists()


async def test_ring_buffer_overrun_is_said_and_reading_goes_on(tmp_path, monkeypatch) -> None:
    root = host(tmp_path)
    (root / "dev/kmsg").write_text(kmsg_line(1, "boot") + kmsg_line(2, "more"))
    real_read = os.read
    calls = {"n": 0}

    def read(fd: int, n: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            return kmsg_line(1, "boot").encode()
        if calls["n"] == 2:
            raise OSError(errno.EPIPE, "Broken pipe")
        if calls["n"] == 3:
            return kmsg_line(40, XID79).encode()
        return real_read(fd, 0)

    monkeypatch.setattr(sources.os, "read", read)
    found = await collect(check(root, tmp_path))
    assert [(f.status, f.condition) for f in found] == [
        (Status.UNKNOWN, "KernelLogGap"),
        (Status.FAULT, "NvidiaGPUUnhealthy"),
    ]
    assert found[0].evidence["lost"] == 38


async def test_log_file_is_followed_across_rotation_and_truncation(tmp_path) -> None:
    root = host(tmp_path)
    (root / "var/log").mkdir(parents=True)
    kern = root / "var/log/kern.log"
    kern.write_bytes(XID13.read_bytes())
    c = check(root, tmp_path, source="file")
    got: list[Finding] = []

    async def follow() -> None:
        async for f in c.stream(follow=True):
            got.append(f)

    task = asyncio.create_task(follow())
    await _until(lambda: len(got) == 2)
    kern.rename(root / "var/log/kern.log.1")  # logrotate: move, then a new file
    kern.write_text("Jun 11 09:44:44 gpu-7 kernel: " + XID79 + "\n")
    await _until(lambda: len(got) == 3)
    kern.write_text("")  # copytruncate: the file shrinks, then grows again
    await asyncio.sleep(0.6)
    append(kern, "Jun 11 09:45:44 gpu-7 kernel: " + XID79.replace("b9", "bc") + "\n")
    await _until(lambda: len(got) == 4)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [(f.reason, f.evidence["xid"]) for f in got] == [
        ("XidUserAppError", "13"),
        ("XidHardwareFailure", "109"),
        ("XidHardwareFailure", "79"),
        ("XidHardwareFailure", "79"),
    ]
    assert got[-1].component == "gpu:0000:bc:00"


async def _until(predicate, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def journal(tmp_path: Path, messages: list[str]) -> Path:
    """Entries in systemd's journal JSON format (one object a line), our real messages."""
    path = tmp_path / "journal.json"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "__CURSOR": f"s=abc;i={i}",
                    "__REALTIME_TIMESTAMP": str(1724281529000000 + i),
                    "__MONOTONIC_TIMESTAMP": str(1843308145 + i),
                    "_TRANSPORT": "kernel",
                    "PRIORITY": "3",
                    "SYSLOG_IDENTIFIER": "kernel",
                    "MESSAGE": m,
                }
            )
            + "\n"
            for i, m in enumerate(messages)
        )
    )
    return path


async def test_journal_source_resumes_after_its_cursor(tmp_path, monkeypatch) -> None:
    root = host(tmp_path)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(
        "FAKE_JOURNAL",
        str(
            journal(
                tmp_path, ["Linux version 6.8.0", XID79, "nvme nvme0: pci function 0000:01:00.0"]
            )
        ),
    )
    first = await collect(check(root, tmp_path, source="journal"), follow=True, limit=1)
    assert [(f.reason, f.evidence["xid"]) for f in first] == [("XidHardwareFailure", "79")]
    assert first[0].evidence["log_time"] == "2024-08-21T23:05:29Z"
    state = json.loads((tmp_path / "state" / "kernel-log.json").read_text())
    assert state["journal_cursor"] == "s=abc;i=1"
    with pytest.raises(TimeoutError):  # nothing new after the cursor
        await collect(check(root, tmp_path, source="journal"), follow=True, limit=1, timeout=1)


async def test_journalctl_failure_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_JOURNAL_FAIL", "1")
    with pytest.raises(sources.SourceError, match="insufficient permissions"):
        await collect(check(host(tmp_path), tmp_path, source="journal"))


def test_auto_picks_what_can_be_read_and_says_when_nothing_can(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    root = host(tmp_path)
    c = check(root, tmp_path)
    assert c.missing() == [
        f"no kernel log source ({root}/dev/kmsg: No such file or directory; journalctl not "
        "found; none of /var/log/kern.log, /var/log/messages)"
    ]
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/messages").write_text("")
    assert c.missing() == []


async def test_unreadable_kmsg_becomes_one_unknown_finding(tmp_path) -> None:
    root = host(tmp_path)
    got: list[Finding] = []

    async def handle(findings: list[Finding]) -> None:
        got.extend(findings)

    c = planned(KernelLogCheck, CheckContext(host_root=root), source="kmsg")
    runner = Runner([c], handle, Metrics(), stream_backoff=(0.05, 0.05))
    task = asyncio.create_task(runner.serve())
    async with asyncio.timeout(30):  # retried with backoff: three tries, however loaded
        while len(got) < 3:
            await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(got) >= 3 and all(f.status is Status.UNKNOWN for f in got)
    assert "cannot read" in got[0].message and "dev/kmsg: No such file" in got[0].message


async def test_kmsg_the_kernel_refuses_falls_back_to_the_log_file(tmp_path, monkeypatch) -> None:
    """Non-root, or kernel.dmesg_restrict=1 without CAP_SYSLOG: the mode says readable, the
    open says EPERM. Neither that nor a journalctl with no journal files to read may keep the
    check on them: the fault in kern.log is found."""
    root = host(tmp_path)
    kmsg = root / "dev/kmsg"
    kmsg.write_text("")  # stands in for the character device (crw-r--r--)
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/kern.log").write_text("Jun 11 09:44:44 gpu-7 kernel: " + XID79 + "\n")
    (root / "run/log/journal").mkdir(parents=True)  # the DaemonSet's DirectoryOrCreate: empty
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # a journalctl
    real_open = os.open

    def kernel_refuses(path, flags, *args, **kwargs):
        if Path(path) == kmsg:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", kernel_refuses)
    with structlog.testing.capture_logs() as lines:
        c = check(root, tmp_path)
        found = await collect(c, follow=True, limit=1)
        with pytest.raises(TimeoutError):  # a restart of the stream: said once, not again
            await collect(c, follow=True, limit=1, timeout=1)
    assert [(f.reason, f.evidence["xid"]) for f in found] == [("XidHardwareFailure", "79")]
    [said] = [ln for ln in lines if ln["event"] == "kernel_log_source"]
    assert said["source"] == "file"
    assert said["passed_over"] == {
        "kmsg": f"{kmsg}: Operation not permitted",
        "journal": "no journal files under the host root",
    }


@pytest.mark.parametrize(
    "journals, refused",
    [
        # none of them opens for the agent (no ACL for its group)
        (["system.journal"], {"system.journal"}),
        # a user's own journal (user-1000.journal, which journald lets that uid read: the
        # pod's uid is the host's first user's) opens, but holds none of the kernel's records
        (["system.journal", "user-1000.journal"], {"system.journal"}),
    ],
)
async def test_a_journal_whose_system_files_the_pod_may_not_read_is_passed_over(
    tmp_path, monkeypatch, journals, refused
) -> None:
    """journalctl opens no file it may not read and prints nothing (a quiet kernel, to us):
    a journal whose system files do not open for the agent sends it on to kern.log."""
    root = host(tmp_path)
    (root / "dev/kmsg").write_text("")
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/kern.log").write_text(syslog(XID79))
    machine = root / "var/log/journal/0123456789abcdef0123456789abcdef"
    machine.mkdir(parents=True)
    for name in journals:
        (machine / name).write_bytes(b"LPKSHHRH")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # a journalctl
    real_open = os.open

    def refuses(path, flags, *args, **kwargs):
        if Path(path).name == "kmsg":
            raise PermissionError(errno.EPERM, "no")
        if Path(path).name in refused:
            raise PermissionError(errno.EACCES, "no")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuses)
    with structlog.testing.capture_logs() as lines:
        found = await collect(check(root, tmp_path), follow=True, limit=1)
    assert [(f.reason, f.evidence["xid"]) for f in found] == [("XidHardwareFailure", "79")]
    [said] = [ln for ln in lines if ln["event"] == "kernel_log_source"]
    assert said["source"] == "file"
    assert said["passed_over"]["journal"] == (
        f"no journal file can be read ({machine / 'system.journal'}: no)"
    )


def syslog(message: str) -> str:
    return f"Jun 11 09:44:44 gpu-7 kernel: {message}\n"


def xid79(bus: int) -> str:
    return syslog(XID79.replace("b9:00", f"{bus:02x}:00"))


async def follower(c: KernelLogCheck, got: list[Finding]) -> asyncio.Task[None]:
    async def follow() -> None:
        async for f in c.stream(follow=True):
            got.append(f)

    return asyncio.create_task(follow())


async def test_a_line_longer_than_the_cap_is_cut_and_reading_goes_on(tmp_path) -> None:
    """One 4.5 MiB line, then an XID 79: the XID is reported (the follower once re-read the
    same 4 MiB forever). A long line keeps its start: an XID in it is still seen."""
    root = host(tmp_path)
    (root / "var/log").mkdir(parents=True)
    kern = root / "var/log/kern.log"
    kern.write_bytes(b"x" * 4_500_000 + b"\n" + xid79(0x20).encode())
    found = await collect(check(root, tmp_path, source="file"), follow=True, limit=1, timeout=10)
    assert [f.component for f in found] == ["gpu:0000:20:00"]
    # and a long line still being written (no end yet), then one that starts with an XID
    append(kern, "y" * 300_000)
    got: list[Finding] = []
    task = await follower(check(root, tmp_path, source="file"), got)
    try:
        await asyncio.sleep(0.6)
        append(kern, "y" * 100_000 + "\n" + xid79(0x21).rstrip("\n") + " " + "z" * 200_000 + "\n")
        await _until(lambda: len(got) == 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got[0].component == "gpu:0000:21:00"
    assert got[0].evidence["line"].endswith("...[truncated by node-health-agent]")


def test_long_lines_are_counted_and_each_line_kept_within_the_cap(tmp_path) -> None:
    path = tmp_path / "kern.log"
    path.write_bytes(b"a" * 5000 + b"\nshort\n" + b"b" * 3000 + b"\n" + b"c" * 10)
    source = sources.FileSource(path, max_line=1000)

    async def read() -> list[bytes]:
        return [item.data async for item in source.items(follow=False)]

    data = b"".join(asyncio.run(read()))
    assert data.split(b"\n") == [b"a" * 1000, b"short", b"b" * 1000, b""]
    assert source.lines_cut == 2


async def test_rotation_reads_the_renamed_file_to_its_end_first(tmp_path) -> None:
    """Five rotations, each with a line written to the old file just before it was renamed
    and one to the new file: every line is reported, in order."""
    root = host(tmp_path)
    (root / "var/log").mkdir(parents=True)
    kern = root / "var/log/kern.log"
    kern.write_text(xid79(0x10))
    got: list[Finding] = []
    task = await follower(check(root, tmp_path, source="file"), got)
    try:
        await _until(lambda: len(got) == 1)
        for i in range(5):
            append(kern, xid79(0x30 + i))  # the last line before rotation, not read yet
            kern.rename(root / f"var/log/kern.log.{i + 1}")
            kern.write_text(xid79(0x40 + i))
            await _until(lambda i=i: len(got) == 3 + 2 * i)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    buses = [f.component[-5:-3] for f in got]
    assert buses == ["10"] + [b for i in range(5) for b in (f"{0x30 + i:x}", f"{0x40 + i:x}")]


async def test_copytruncate_is_seen_even_when_the_new_content_outgrows_the_old(tmp_path) -> None:
    root = host(tmp_path)
    (root / "var/log").mkdir(parents=True)
    kern = root / "var/log/kern.log"
    kern.write_text(xid79(0x10))
    got: list[Finding] = []
    task = await follower(check(root, tmp_path, source="file"), got)
    try:
        await _until(lambda: len(got) == 1)
        # copytruncate, then a burst at once: longer than the file was before
        kern.write_text(xid79(0x50) + syslog("nvme nvme0: pci function 0000:01:00.0") * 5)
        await _until(lambda: len(got) == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got[1].component == "gpu:0000:50:00"


async def test_a_journal_entry_over_4_kib_is_parsed_whole(tmp_path, monkeypatch) -> None:
    root = host(tmp_path)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    path = journal(tmp_path, [XID79 + " " + "x" * 5000, XID79.replace("b9", "ba")])
    with path.open("a") as fh:  # an entry over the reader's limit is dropped, and reading goes on
        fh.write(json.dumps({"MESSAGE": "y" * (sources.JOURNAL_LINE_LIMIT + 10)}) + "\n")
    monkeypatch.setenv("FAKE_JOURNAL", str(path))
    (tmp_path / "more").mkdir()
    append(path, journal(tmp_path / "more", [XID79.replace("b9", "bb")]).read_text())
    found = await collect(check(root, tmp_path, source="journal"))
    assert [f.component for f in found] == ["gpu:0000:b9:00", "gpu:0000:ba:00", "gpu:0000:bb:00"]


async def test_a_followed_file_wakes_on_its_own_writes_not_on_its_neighbours(tmp_path) -> None:
    from checks.kernel_log import watch

    (tmp_path / "kern.log").write_text("")
    w = watch.FileWatch(tmp_path / "kern.log")
    assert w.kind == "inotify"  # Linux, as every node is
    try:
        waiting = asyncio.create_task(w.changed())
        await asyncio.sleep(0.05)
        append(tmp_path / "syslog", "another program's line\n")
        await asyncio.sleep(0.3)
        assert not waiting.done()  # a neighbour's write is no reason to read
        append(tmp_path / "kern.log", syslog(XID79))
        await asyncio.wait_for(waiting, watch.SAFETY_SECONDS / 2)  # woken, not timed out
    finally:
        w.close()


async def test_without_inotify_the_file_is_polled_and_rotation_still_followed(
    tmp_path, monkeypatch
) -> None:
    from checks.kernel_log import watch

    monkeypatch.setattr(watch, "_libc", lambda: None)  # no inotify here (not Linux)
    assert watch.FileWatch(tmp_path / "kern.log").kind == "poll"
    root = host(tmp_path)
    (root / "var/log").mkdir(parents=True)
    kern = root / "var/log/kern.log"
    kern.write_text(xid79(0x10))
    got: list[Finding] = []
    task = await follower(check(root, tmp_path, source="file"), got)
    try:
        await _until(lambda: len(got) == 1)
        kern.rename(root / "var/log/kern.log.1")
        kern.write_text(xid79(0x20))
        await _until(lambda: len(got) == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got[1].component == "gpu:0000:20:00"
