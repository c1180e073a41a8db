"""Disk, runtime/kubelet and memory pressure checks on host trees under a fixture root."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from checks import disk as disk_module
from checks.api import Action, CheckContext, Status
from checks.disk import DiskCheck, DiskOptions, mount_of, parse_mountinfo
from checks.memory import MemoryCheck, MemoryOptions
from checks.runtime import RuntimeCheck, RuntimeOptions
from tests.test_proc import alive

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
BIN = Path(__file__).parent / "bin"


def mounts_file(root: Path, lines: list[str]) -> None:
    """The host's mount table, PID 1's /proc/1/mountinfo in its documented format (proc(5)),
    from "source point fstype options" entries that name test dirs: each carries the device
    of the test dir it names, as the kernel's would (0:0 for a point not in the tree)."""
    out = []
    for n, line in enumerate(lines):
        source, point, fstype, opts = line.split()[:4]
        here = root / point.lstrip("/").replace("\\040", " ")
        dev = os.stat(here).st_dev if here.exists() else 0
        mount_opts = "ro" if "ro" in opts.split(",") else "rw"
        out.append(
            f"{n + 20} 1 {os.major(dev)}:{os.minor(dev)} / {point} {mount_opts},relatime"
            f" shared:{n + 1} - {fstype} {source} {opts}\n"
        )
    (root / "proc/1").mkdir(parents=True, exist_ok=True)
    (root / "proc/1/mountinfo").write_text("".join(out))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "host"
    for d in ("var/lib/kubelet", "var/lib/containerd", "fsx"):
        (r / d).mkdir(parents=True)
    mounts_file(
        r,
        [
            "/dev/nvme0n1p1 / xfs rw,noatime,attr2,inode64,logbufs=8,logbsize=32k,noquota 0 0",
            "/dev/md127 /var/lib/kubelet xfs rw,noatime 0 0",
            "10.1.2.3@tcp:/abcdefgh /fsx lustre rw,flock,lazystatfs 0 0",
            "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
        ],
    )
    return r


def by(findings, condition: str, component: str):
    return next(f for f in findings if f.condition == condition and f.component == component)


# ---- disk ----------------------------------------------------------------------------------------


def test_mount_table_parsing_and_lookup() -> None:
    # proc(5)'s example line, a mount with a space in its point, and garbage
    mounts = parse_mountinfo(
        "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "40 36 8:17 / /mnt/with\\040space rw,relatime shared:2 - ext4 /dev/sdb1 ro\n"
        "garbage\n"
    )
    assert [m.point for m in mounts] == ["/mnt2", "/mnt/with space"]
    assert (mounts[0].fstype, mounts[0].device, mounts[0].dev) == (
        "ext3",
        "/dev/root",
        os.makedev(98, 0),
    )
    assert "ro" not in mounts[0].options
    # read-only in its superblock only (ext4 errors=remount-ro): still read-only
    assert "ro" in mounts[1].options and not mounts[1].mount_ro
    assert mount_of("/mnt/with space/x", mounts).device == "/dev/sdb1"
    assert mount_of("/mnt/without", mounts) is None


def test_disk_usage_per_mount_with_discovered_lustre(root) -> None:
    found = DiskCheck(CheckContext(host_root=root)).collect()
    points = {f.component for f in found if f.condition == "DiskSpaceExhaustion"}
    assert points == {"fs:/", "fs:/var/lib/kubelet", "fs:/var/lib/containerd", "fs:/fsx"}
    assert all(f.status is Status.OK for f in found)


def test_disk_thresholds_warn_then_fail(root) -> None:
    used = by(
        DiskCheck(CheckContext(host_root=root)).collect(), "DiskSpaceExhaustion", "fs:/"
    ).evidence["percent"]
    warn = DiskOptions(space_warn_percent=max(used - 1, 0), space_fail_percent=100)
    f = by(DiskCheck(CheckContext(host_root=root), warn).collect(), "DiskSpaceExhaustion", "fs:/")
    assert (f.status, f.reason, f.action) == (Status.FAULT, "DiskSpaceLow", Action.NONE)
    fail = DiskOptions(space_warn_percent=0, space_fail_percent=0, fail_action=Action.REBOOT)
    f = by(DiskCheck(CheckContext(host_root=root), fail).collect(), "DiskSpaceExhaustion", "fs:/")
    assert (f.reason, f.action) == ("DiskSpaceCritical", Action.REBOOT)
    assert "GiB free" in f.message


def test_read_only_mount_of_a_writable_path(root) -> None:
    mounts_file(root, ["/dev/md127 /var/lib/kubelet xfs ro,noatime 0 0", "/dev/root / ext4 rw 0 0"])
    found = DiskCheck(CheckContext(host_root=root)).collect()
    f = by(found, "ReadonlyFilesystem", "fs:/var/lib/kubelet")
    assert (f.status, f.reason, f.action) == (Status.FAULT, "MountedReadOnly", Action.REBOOT)
    assert by(found, "ReadonlyFilesystem", "fs:/").status is Status.OK


def test_write_probe_catches_erofs_and_cleans_up(root, monkeypatch) -> None:
    check = DiskCheck(CheckContext(host_root=root))
    ok = by(check.collect(), "ReadonlyFilesystem", "probe:/var/lib/kubelet")
    assert ok.status is Status.OK and not list((root / "var/lib/kubelet").iterdir())

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(disk_module.os, "open", read_only)
    f = by(check.collect(), "ReadonlyFilesystem", "probe:/var/lib/kubelet")
    assert (f.status, f.reason, f.action) == (Status.FAULT, "WriteProbeFailed", Action.REBOOT)


def test_probe_that_cannot_decide_is_unknown(root, monkeypatch) -> None:
    def denied(*_a, **_k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(disk_module.os, "open", denied)
    f = by(
        DiskCheck(CheckContext(host_root=root)).collect(),
        "ReadonlyFilesystem",
        "probe:/var/lib/kubelet",
    )
    assert f.status is Status.UNKNOWN


def test_the_hosts_mount_table_is_pid_1s_not_the_agents_own(root) -> None:
    """In the DaemonSet the host's /proc is under the host root, and its `mounts` resolves
    through `self/` to the agent's own mount namespace, whose `/` is read-only by design."""
    (root / "proc/self").mkdir()
    (root / "proc/self/mounts").write_text("overlay / overlay ro,relatime 0 0\n")
    (root / "proc/mounts").symlink_to("self/mounts")
    found = DiskCheck(CheckContext(host_root=root)).collect()
    flags = [f for f in found if f.condition == "ReadonlyFilesystem"]
    assert flags and all(f.status is Status.OK for f in flags)


def test_a_host_filesystem_not_mounted_into_the_agent_is_not_measured(root) -> None:
    """The host's `/` and a shared filesystem that are not the directories under the host
    root (their devices differ): measuring those would measure the container's own root."""
    table = (root / "proc/1/mountinfo").read_text().splitlines()
    elsewhere = [
        " ".join(["253:7" if i == 2 else w for i, w in enumerate(ln.split())])
        for ln in table
        if ln.split()[4] in ("/", "/fsx")
    ]
    kept = [ln for ln in table if ln.split()[4] not in ("/", "/fsx")]
    (root / "proc/1/mountinfo").write_text("\n".join(kept + elsewhere) + "\n")
    found = DiskCheck(CheckContext(host_root=root)).collect()
    measured = {f.component for f in found if f.condition == "DiskSpaceExhaustion"}
    assert measured == {"fs:/var/lib/kubelet"}
    # the mount flags come from the host's table and still say read-write
    assert by(found, "ReadonlyFilesystem", "fs:/").status is Status.OK


def test_the_host_table_is_unreadable_is_unknown(root) -> None:
    (root / "proc/1/mountinfo").unlink()
    (root / "proc/1/mountinfo").mkdir()  # exists, cannot be read as a file
    [f] = DiskCheck(CheckContext(host_root=root)).collect()
    assert (f.status, f.reason) == (Status.UNKNOWN, "MountTableUnreadable")


def test_erofs_from_a_read_only_bind_of_the_agents_own_is_unknown(
    root, monkeypatch, tmp_path
) -> None:
    """`readOnly: true` on the volume in the pod spec: the probe cannot write, the host can."""
    kubelet = os.path.realpath(root / "var/lib/kubelet")
    own = tmp_path / "own-mountinfo"
    own.write_text(
        "22 1 0:21 / / ro,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n"
        f"30 22 259:1 /var/lib/kubelet {kubelet} ro,relatime - xfs /dev/nvme0n1p1 rw\n"
    )
    monkeypatch.setattr(disk_module, "OWN_MOUNTS", own)

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(disk_module.os, "open", read_only)
    f = by(
        DiskCheck(CheckContext(host_root=root)).collect(),
        "ReadonlyFilesystem",
        "probe:/var/lib/kubelet",
    )
    assert (f.status, f.reason) == (Status.UNKNOWN, "WriteProbeNotPossible")


# ---- memory pressure ---------------------------------------------------------------------------


def test_psi_full_stall_is_memory_exhaustion(host_root) -> None:
    check = MemoryCheck(
        CheckContext(host_root=host_root),
        MemoryOptions(available_min_percent=1, psi_full_avg60_percent=0, polls=1),
    )
    (f,) = check.collect()
    assert (f.status, f.reason) == (Status.FAULT, "MemoryPressureStall")
    assert f.evidence["psi_full_avg60"] == 0.0


def test_no_psi_file_means_no_psi_verdict(host_root) -> None:
    (host_root / "proc/pressure/memory").unlink()
    check = MemoryCheck(CheckContext(host_root=host_root), MemoryOptions(psi_full_avg60_percent=0))
    (f,) = check.collect()
    assert f.status is Status.OK and "psi_full_avg60" not in f.evidence


# ---- runtime and kubelet -----------------------------------------------------------------------


class H2Server:
    """A unix-socket server that answers an HTTP/2 preface with a SETTINGS frame (RFC 9113),
    as containerd's and CRI-O's gRPC servers do; or with nothing when `mute`."""

    def __init__(self, path: Path, mute: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.mute = mute
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                if self.mute:  # a hung runtime: the connection stays open, nothing comes
                    time.sleep(1.5)
                else:
                    conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def kubelet() -> Iterator[dict]:
    state = {"code": 200, "body": b"ok"}

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["code"])
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    yield state
    server.shutdown()


@pytest.fixture
def runtime_root(tmp_path: Path) -> Path:
    # A short path: unix socket paths are limited to about 100 bytes.
    r = Path(f"/tmp/nh-{os.getpid()}-{id(tmp_path) % 10000}")
    (r / "run/containerd").mkdir(parents=True)
    (r / "var/lib/kubelet").mkdir(parents=True)
    (r / "proc/sys/kernel").mkdir(parents=True)
    (r / "proc/sys/fs").mkdir(parents=True)
    # loadavg: loads, runnable/total scheduling entities, last PID (proc(5)); pid_max and
    # file-nr (allocated, unused, max) as documented in the kernel's sysctl docs.
    (r / "proc/loadavg").write_text("0.52 0.58 0.59 3/1200 45678\n")
    (r / "proc/sys/kernel/pid_max").write_text("4194304\n")
    (r / "proc/sys/fs/file-nr").write_text("12160\t0\t9223372036854775807\n")
    yield r
    shutil.rmtree(r, ignore_errors=True)


def runtime(root: Path, kubelet: dict, monkeypatch, **options) -> RuntimeCheck:
    monkeypatch.setenv("PATH", str(root / "no-tools"))
    opts = RuntimeOptions(kubelet_healthz=kubelet["url"], probe_timeout=0.5, **options)
    return RuntimeCheck(CheckContext(host_root=root), opts)


async def test_healthy_runtime_and_kubelet(runtime_root, kubelet, monkeypatch) -> None:
    server = H2Server(runtime_root / "run/containerd/containerd.sock")
    found = await runtime(runtime_root, kubelet, monkeypatch).poll()
    server.close()
    assert {(f.condition, f.status) for f in found} == {
        ("ContainerRuntimeUnhealthy", Status.OK),
        ("KubeletUnhealthy", Status.OK),
        ("PidExhaustion", Status.OK),
        ("FileDescriptorExhaustion", Status.OK),
    }


async def test_runtime_not_answering_is_a_fault_only_after_polls(
    runtime_root, kubelet, monkeypatch
) -> None:
    server = H2Server(runtime_root / "run/containerd/containerd.sock", mute=True)
    check = runtime(runtime_root, kubelet, monkeypatch, polls=2)
    first = by(await check.poll(), "ContainerRuntimeUnhealthy", "container-runtime")
    second = by(await check.poll(), "ContainerRuntimeUnhealthy", "container-runtime")
    server.close()
    assert first.status is Status.UNKNOWN and "1 of 2 polls" in first.message
    assert (second.status, second.reason, second.action) == (
        Status.FAULT,
        "ContainerRuntimeDown",
        Action.REBOOT,
    )
    assert "no answer within 0.5s" in second.message


async def test_kubelet_healthz_failing(runtime_root, kubelet, monkeypatch) -> None:
    kubelet.update(code=500, body=b"[-]syncloop failed")
    f = by(
        await runtime(runtime_root, kubelet, monkeypatch, polls=1).poll(),
        "KubeletUnhealthy",
        "kubelet",
    )
    assert (f.status, f.reason) == (Status.FAULT, "KubeletDown")
    assert "answered 500" in f.message


async def test_crictl_network_not_ready(runtime_root, kubelet, monkeypatch) -> None:
    server = H2Server(runtime_root / "run/containerd/containerd.sock")
    check = runtime(runtime_root, kubelet, monkeypatch, polls=1)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv(
        "FAKE_CRICTL_OUTPUT", str(HOSTS.parent / "crictl" / "info-network-not-ready.json")
    )
    f = by(await check.poll(), "ContainerRuntimeUnhealthy", "container-runtime")
    server.close()
    assert (f.status, f.reason) == (Status.FAULT, "ContainerRuntimeDown")
    assert "NetworkReady is false: NetworkPluginNotReady" in f.message


@pytest.mark.parametrize(
    ("mode", "rc", "why"),
    [
        ("killed", 0, "crictl was killed by SIGKILL"),
        ("hang", 0, "crictl did not finish in time and was killed"),
        ("orphan", 0, "crictl left a process behind that held its output"),
        ("garbage", 0, "crictl info printed something that is not its JSON status"),
        ("", 1, "crictl info exited 1"),
    ],
)
async def test_a_broken_crictl_is_unknown_while_the_socket_answers(
    runtime_root, kubelet, monkeypatch, tmp_path, mode, rc, why
) -> None:
    """crictl's report of a not-ready runtime counts only when crictl ran to completion."""
    server = H2Server(runtime_root / "run/containerd/containerd.sock")
    check = runtime(runtime_root, kubelet, monkeypatch, polls=1)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin")
    output = HOSTS.parent / "crictl" / "info-network-not-ready.json"
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_CRICTL_OUTPUT", str(output))
    monkeypatch.setenv("FAKE_CRICTL_MODE", mode)
    monkeypatch.setenv("FAKE_CRICTL_RC", str(rc))
    monkeypatch.setenv("FAKE_CRICTL_PIDFILE", str(pidfile))
    monkeypatch.setenv("FAKE_SYSTEMCTL_FAILED", "")
    for _ in range(2):  # not even after `polls` polls in a row
        f = by(await check.poll(), "ContainerRuntimeUnhealthy", "container-runtime")
        assert (f.status, f.reason, f.action) == (Status.UNKNOWN, "ToolFailed", Action.NONE)
        assert f.message.startswith(why)
    server.close()
    if mode in ("hang", "orphan"):  # its child went with it
        assert not alive(int(pidfile.read_text()))


async def test_failed_systemd_unit(runtime_root, kubelet, monkeypatch) -> None:
    server = H2Server(runtime_root / "run/containerd/containerd.sock")
    check = runtime(runtime_root, kubelet, monkeypatch, polls=1)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("FAKE_SYSTEMCTL_FAILED", "containerd.service")
    monkeypatch.setenv("FAKE_CRICTL_OUTPUT", str(HOSTS.parent / "crictl" / "info-ready.json"))
    found = await check.poll()
    server.close()
    f = by(found, "ContainerRuntimeUnhealthy", "container-runtime")
    assert f.status is Status.FAULT and "containerd.service is failed" in f.message
    assert by(found, "KubeletUnhealthy", "kubelet").status is Status.OK


async def test_pid_and_fd_exhaustion(runtime_root, kubelet, monkeypatch) -> None:
    (runtime_root / "proc/sys/kernel/pid_max").write_text("1230\n")
    (runtime_root / "proc/sys/fs/file-nr").write_text("950\t0\t1000\n")
    found = await runtime(runtime_root, kubelet, monkeypatch).poll()
    pids = by(found, "PidExhaustion", "node")
    fds = by(found, "FileDescriptorExhaustion", "node")
    assert (pids.reason, pids.action) == ("PidsCritical", Action.REBOOT)
    assert "1200 of 1230 PIDs in use" in pids.message
    assert (fds.reason, fds.action) == ("FileDescriptorsLow", Action.NONE)


async def test_no_runtime_and_no_kubelet_is_nothing_to_judge(
    tmp_path, kubelet, monkeypatch
) -> None:
    found = await runtime(tmp_path, kubelet, monkeypatch).poll()
    assert found == []


async def test_a_runtime_socket_this_user_may_not_use_is_unknown_never_a_fault(
    runtime_root, kubelet, monkeypatch
) -> None:
    """containerd's socket is root's (0660): an agent running as non-root cannot judge it."""
    sock = runtime_root / "run/containerd/containerd.sock"
    server = H2Server(sock)
    import checks.runtime

    real = checks.runtime.os.access
    monkeypatch.setattr(
        checks.runtime.os, "access", lambda p, m: False if p == str(sock) else real(p, m)
    )
    check = runtime(runtime_root, kubelet, monkeypatch, polls=1)
    found = by(await check.poll(), "ContainerRuntimeUnhealthy", "container-runtime")
    server.close()
    assert (found.status, found.reason) == (Status.UNKNOWN, "NoPermission")
    assert "may not connect" in found.message
