"""Disks: space and inodes per mount, and filesystems that went read-only under us.

Mounts checked: the configured ones (root, kubelet and container runtime state) that exist on
the host, plus local NVMe filesystems and shared filesystems (Lustre, NFS, ...) found in the
host's mount table. A filesystem that should be writable is caught two ways: its mount flags
say `ro`, or a small write probe in a configured directory fails with EROFS. Device I/O errors
come from the kernel-log check.

The host's mount table is PID 1's (`<host_root>/proc/1/mountinfo`, as node_exporter reads it
under its procfs root), never `<host_root>/proc/mounts`: that resolves through `self/` to the
agent's own mount namespace, where a container's `/` is read-only by design. Its mount points
are host paths: a filesystem is measured or probed under the host root only where that path
shows the host's very filesystem (the same device); a host directory not mounted into the
agent is not measured at all, rather than measuring the container's own root in its place.

A full disk is reported, not acted on by default: kubelet's eviction frees space and taints
the node; `fail_action` changes that. A read-only filesystem asks for a reboot (fsck).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, Finding, PollingCheck, Status, graded


class DiskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    mounts: list[str] = Field(
        default_factory=lambda: ["/", "/var/lib/kubelet", "/var/lib/containerd"]
    )
    discover: bool = Field(True, description="add local NVMe and shared filesystems mounted")
    shared_types: list[str] = Field(
        default_factory=lambda: ["lustre", "nfs", "nfs4", "efs", "fuse.mountpoint-s3"]
    )
    space_warn_percent: float = Field(85.0, ge=0, le=100)
    space_fail_percent: float = Field(95.0, ge=0, le=100)
    inodes_warn_percent: float = Field(90.0, ge=0, le=100)
    inodes_fail_percent: float = Field(97.0, ge=0, le=100)
    fail_action: Action = Action.NONE
    writable: list[str] = Field(
        default_factory=lambda: ["/", "/var/lib/kubelet", "/var/lib/containerd"]
    )
    write_probe_dirs: list[str] = Field(default_factory=lambda: ["/var/lib/kubelet"])
    readonly_action: Action = Action.REBOOT


HOST_MOUNTS = "/proc/1/mountinfo"  # read under the host root
OWN_MOUNTS = Path("/proc/self/mountinfo")  # the agent's own mount namespace, not the host's


@dataclass(frozen=True)
class Mount:
    device: str
    point: str
    fstype: str
    options: frozenset[str]  # the mount's and its superblock's: `ro` in either is read-only
    dev: int | None = None  # st_dev of the filesystem (major:minor)
    mount_ro: bool = False  # read-only by this mount's own flags (a read-only bind mount)


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/<pid>/mountinfo (proc(5)): "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3
    /dev/root rw,errors=continue"; octal escapes such as \\040 undone."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        if len(parts) < sep + 4 or ":" not in parts[2]:
            continue
        major, _, minor = parts[2].partition(":")
        mount_opts = set(parts[5].split(","))
        try:
            dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        out.append(
            Mount(
                _unescape(parts[sep + 2]),
                _unescape(parts[4]),
                parts[sep + 1],
                frozenset(mount_opts | set(parts[sep + 3].split(","))),
                dev,
                "ro" in mount_opts,
            )
        )
    return out


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount a path lives on: the longest mount point that contains it."""
    best = None
    for m in mounts:
        inside = path == m.point or path.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


class DiskCheck(PollingCheck):
    name = "disk"
    description = "space and inodes per mount; read-only filesystems (mount flags, write probe)"
    interval = 60.0
    timeout = 20.0
    needs_paths = (HOST_MOUNTS,)
    Options: ClassVar[type[BaseModel]] = DiskOptions

    def collect(self) -> list[Finding]:
        opts: DiskOptions = self.options  # type: ignore[assignment]
        try:
            mounts = parse_mountinfo(self.ctx.path(HOST_MOUNTS).read_text())
        except OSError as exc:
            return [
                Finding(
                    "fs",
                    "ReadonlyFilesystem",
                    Status.UNKNOWN,
                    "MountTableUnreadable",
                    f"cannot read the host's mount table {HOST_MOUNTS}: {exc.strerror}",
                )
            ]
        findings: list[Finding] = []
        for point in self._points(opts, mounts):
            findings += self._usage(point, opts)
        for path in opts.writable:
            m = mount_of(path, mounts)
            if m is not None and (m.point == path or self.ctx.path(path).exists()):
                findings.append(self._flags(path, m, opts))
        for path in opts.write_probe_dirs:
            m = mount_of(path, mounts)
            if m is not None and self._visible(path, m) and self.ctx.path(path).is_dir():
                findings.append(self._probe(path, opts))
        return findings

    def _points(self, opts: DiskOptions, mounts: list[Mount]) -> list[str]:
        points = list(opts.mounts)
        if opts.discover:
            points += [
                m.point
                for m in mounts
                if m.fstype in opts.shared_types or m.device.startswith("/dev/nvme")
            ]
        return [
            p
            for p in dict.fromkeys(points)
            if (m := mount_of(p, mounts)) is not None and self._visible(p, m)
        ]

    def _visible(self, path: str, m: Mount) -> bool:
        """Whether `path` under the host root is the host's own filesystem `m`, not a directory
        of the agent's container standing where the host's is not mounted. With the host
        root at `/` the path is the host's own (and a btrfs subvolume's device is not its
        mount table's)."""
        try:
            st = os.stat(self.ctx.path(path))
        except OSError:
            return False
        return self.ctx.host_root == Path("/") or st.st_dev == m.dev

    def _usage(self, point: str, opts: DiskOptions) -> list[Finding]:
        component = f"fs:{point}"
        try:
            st = os.statvfs(self.ctx.path(point))
        except OSError as exc:
            return [
                Finding(
                    component,
                    "DiskSpaceExhaustion",
                    Status.UNKNOWN,
                    "StatFailed",
                    f"statvfs {point}: {exc.strerror}",
                )
            ]
        used = st.f_blocks - st.f_bfree
        space = 100.0 * used / (used + st.f_bavail) if used + st.f_bavail else 0.0
        free_bytes = st.f_bavail * st.f_frsize
        out = [
            graded(
                component,
                "DiskSpaceExhaustion",
                "DiskSpace",
                space,
                opts.space_warn_percent,
                opts.space_fail_percent,
                opts.fail_action,
                f"{point} is {space:.1f}% full, {free_bytes / 2**30:.1f} GiB free",
                {"free_bytes": free_bytes},
            )
        ]
        if st.f_files:  # some filesystems (Lustre clients, NFS) report no inode table
            inodes = 100.0 * (st.f_files - st.f_ffree) / st.f_files
            out.append(
                graded(
                    component,
                    "InodeExhaustion",
                    "Inodes",
                    inodes,
                    opts.inodes_warn_percent,
                    opts.inodes_fail_percent,
                    opts.fail_action,
                    f"{point} uses {inodes:.1f}% of its inodes",
                    {"free": st.f_ffree},
                )
            )
        return out

    def _flags(self, path: str, m: Mount, opts: DiskOptions) -> Finding:
        component = f"fs:{m.point}"
        evidence = {"path": path, "device": m.device, "fstype": m.fstype}
        if "ro" in m.options:
            return Finding(
                component,
                "ReadonlyFilesystem",
                Status.FAULT,
                "MountedReadOnly",
                f"{m.point} ({m.device}) is mounted read-only but {path} must be writable",
                opts.readonly_action,
                evidence,
            )
        return Finding(
            component,
            "ReadonlyFilesystem",
            Status.OK,
            "FilesystemIsNotReadOnly",
            f"{m.point} is mounted read-write",
            evidence=evidence,
        )

    def _probe(self, path: str, opts: DiskOptions) -> Finding:
        component = f"probe:{path}"
        probe = self.ctx.path(path) / f".node-health-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"node-health write probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                Path(probe).unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno == errno.EROFS and self._mounted_read_only_here(probe.parent):
                return Finding(
                    component,
                    "ReadonlyFilesystem",
                    Status.UNKNOWN,
                    "WriteProbeNotPossible",
                    f"cannot probe {path}: it is mounted read-only into the agent",
                    evidence={"errno": "EROFS"},
                )
            if exc.errno == errno.EROFS:
                return Finding(
                    component,
                    "ReadonlyFilesystem",
                    Status.FAULT,
                    "WriteProbeFailed",
                    f"cannot write in {path}: read-only file system",
                    opts.readonly_action,
                    {"errno": "EROFS"},
                )
            return Finding(
                component,
                "ReadonlyFilesystem",
                Status.UNKNOWN,
                "WriteProbeError",
                f"cannot probe {path}: {exc.strerror}",
                evidence={"errno": errno.errorcode.get(exc.errno or 0, "?")},
            )
        return Finding(
            component, "ReadonlyFilesystem", Status.OK, "WriteProbeSucceeded", f"{path} is writable"
        )

    @staticmethod
    def _mounted_read_only_here(directory: Path) -> bool:
        """A read-only bind mount of the agent's own (`readOnly: true` in the pod spec) says
        nothing of the host's filesystem; only its mount flags, not its superblock's, tell."""
        try:
            own = parse_mountinfo(OWN_MOUNTS.read_text())
        except OSError:
            return False
        m = mount_of(os.path.realpath(directory), own)
        return m is not None and m.mount_ro
