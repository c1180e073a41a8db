"""Disks: space and inodes per mount, and filesystems that went read-only under us.

Mounts checked: the configured ones (root, kubelet and container runtime state) that exist on
the host, plus, found in /proc/mounts, local NVMe filesystems and shared filesystems (Lustre,
NFS, ...). A filesystem that should be writable is caught two ways: its mount flags say `ro`,
or a small write probe in a configured directory fails with EROFS. Device I/O errors come from
the kernel-log check.

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


@dataclass(frozen=True)
class Mount:
    device: str
    point: str
    fstype: str
    options: frozenset[str]


def parse_mounts(text: str) -> list[Mount]:
    """/proc/mounts (proc(5), fstab(5) fields); octal escapes such as \\040 undone."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        device, point, fstype, opts = (_unescape(p) for p in parts[:4])
        out.append(Mount(device, point, fstype, frozenset(opts.split(","))))
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
    needs_paths = ("/proc/mounts",)
    Options: ClassVar[type[BaseModel]] = DiskOptions

    def collect(self) -> list[Finding]:
        opts: DiskOptions = self.options  # type: ignore[assignment]
        mounts = parse_mounts(self.ctx.path("/proc/mounts").read_text())
        findings: list[Finding] = []
        for point in self._points(opts, mounts):
            findings += self._usage(point, opts)
        for path in opts.writable:
            m = mount_of(path, mounts)
            if m is not None and self.ctx.path(path).exists():
                findings.append(self._flags(path, m, opts))
        for path in opts.write_probe_dirs:
            if self.ctx.path(path).is_dir():
                findings.append(self._probe(path, opts))
        return findings

    def _points(self, opts: DiskOptions, mounts: list[Mount]) -> list[str]:
        points = [p for p in opts.mounts if self.ctx.path(p).exists()]
        if opts.discover:
            points += [
                m.point
                for m in mounts
                if m.fstype in opts.shared_types or m.device.startswith("/dev/nvme")
            ]
        return list(dict.fromkeys(points))

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
