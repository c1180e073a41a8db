"""Container runtime and kubelet: are they answering, and is the node out of PIDs or files?

- The runtime's socket (containerd or CRI-O) must answer: both serve gRPC, so an HTTP/2
  connection preface must be met with the server's SETTINGS frame (RFC 9113, section 3.4).
- Where `crictl` is installed, `crictl info` must report RuntimeReady and NetworkReady.
- kubelet's `/healthz` must say `ok`; systemd units (where systemd answers) must be active.
- PIDs in use (/proc/loadavg) against kernel.pid_max, and open files (/proc/sys/fs/file-nr)
  against fs.file-max.

A runtime that fails to answer is a fault only after `polls` failed polls in a row, so a
restart of containerd is not a node fault. A `crictl` that crashed, hung, was killed, left a
child behind or printed what we cannot read says nothing: the finding is unknown, with why.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, CheckContext, Finding, PollingCheck, Status, graded
from checks.proc import run_command

# RFC 9113 3.4: the client preface, then a SETTINGS frame (here empty: length 0, type 4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS = 0x04


class RuntimeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    sockets: list[str] = Field(
        default_factory=lambda: ["/run/containerd/containerd.sock", "/var/run/crio/crio.sock"]
    )
    crictl: str = "crictl"
    kubelet_healthz: str | None = "http://127.0.0.1:10248/healthz"
    kubelet_dir: str = Field("/var/lib/kubelet", description="no kubelet here: not checked")
    systemctl: str = "systemctl"
    systemd_units: list[str] = Field(default_factory=lambda: ["kubelet", "containerd", "crio"])
    probe_timeout: float = Field(3.0, gt=0)
    polls: int = Field(3, ge=1, description="failed polls in a row before a fault")
    action: Action = Action.REBOOT
    pid_warn_percent: float = Field(90.0, ge=0, le=100)
    pid_fail_percent: float = Field(97.0, ge=0, le=100)
    fd_warn_percent: float = Field(90.0, ge=0, le=100)
    fd_fail_percent: float = Field(97.0, ge=0, le=100)
    exhaustion_action: Action = Action.REBOOT


class RuntimeCheck(PollingCheck):
    name = "runtime"
    description = "container runtime socket and crictl, kubelet /healthz, systemd units, PIDs/FDs"
    interval = 30.0
    timeout = 20.0
    Options: ClassVar[type[BaseModel]] = RuntimeOptions

    def __init__(self, ctx: CheckContext, options: BaseModel | None = None) -> None:
        super().__init__(ctx, options)
        self._failures: dict[str, int] = {}  # failed polls in a row, per component

    async def poll(self) -> list[Finding]:
        opts: RuntimeOptions = self.options  # type: ignore[assignment]
        found = [
            *await self._runtime(opts),
            *await self._kubelet(opts),
            *await asyncio.to_thread(self._exhaustion, opts),
        ]
        return [f for f in found if f is not None]

    # ---- runtime and kubelet ---------------------------------------------------------------------

    async def _runtime(self, opts: RuntimeOptions) -> list[Finding | None]:
        sock = next((s for s in opts.sockets if self.ctx.path(s).exists()), None)
        if sock is None:
            return []  # no runtime socket on this host (or not mounted): nothing to judge
        problems: list[str] = []
        unknown: list[str] = []  # why a tool told us nothing
        path = str(self.ctx.path(sock))
        if not os.access(path, os.W_OK):  # connecting needs write permission on the socket
            return [
                Finding(
                    "container-runtime",
                    "ContainerRuntimeUnhealthy",
                    Status.UNKNOWN,
                    "NoPermission",
                    f"{sock}: this agent's user may not connect to it (run as root to check "
                    "the runtime)",
                    evidence={"socket": sock},
                )
            ]
        error = await asyncio.to_thread(_h2_answers, path, opts.probe_timeout)
        if error:
            problems.append(f"{sock} does not answer: {error}")
        elif shutil.which(opts.crictl):
            said, why = await _crictl_problems(opts.crictl, path, opts.probe_timeout)
            problems += said
            unknown += [why] if why else []
        problems += await self._units(opts, [u for u in opts.systemd_units if u != "kubelet"])
        return [
            self._judge(
                "ContainerRuntimeUnhealthy",
                "container-runtime",
                problems,
                unknown,
                "ContainerRuntimeDown",
                "ContainerRuntimeIsUp",
                opts,
                {"socket": sock},
            )
        ]

    async def _kubelet(self, opts: RuntimeOptions) -> list[Finding | None]:
        if not self.ctx.path(opts.kubelet_dir).is_dir():
            return []  # not a Kubernetes node (or the kubelet dir is not mounted)
        problems = await self._units(opts, [u for u in opts.systemd_units if u == "kubelet"])
        if opts.kubelet_healthz:
            problems += await asyncio.to_thread(_healthz, opts.kubelet_healthz, opts.probe_timeout)
        elif not problems:
            return []
        return [
            self._judge(
                "KubeletUnhealthy",
                "kubelet",
                problems,
                [],
                "KubeletDown",
                "KubeletIsHealthy",
                opts,
                {"healthz": opts.kubelet_healthz or ""},
            )
        ]

    async def _units(self, opts: RuntimeOptions, units: list[str]) -> list[str]:
        """Units systemd knows and that are not active; nothing where systemd does not answer
        (or systemctl did not finish)."""
        if not units or not shutil.which(opts.systemctl):
            return []
        argv = [opts.systemctl, "show", "--property=Id,LoadState,ActiveState", *units]
        try:
            out = await run_command(argv, opts.probe_timeout)
        except OSError:
            return []
        if not out.ok:
            return []
        problems = []
        for block in out.stdout.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if props.get("LoadState") == "loaded" and props.get("ActiveState") != "active":
                problems.append(f"{props.get('Id')} is {props.get('ActiveState')}")
        return problems

    def _judge(
        self,
        condition: str,
        component: str,
        problems: list[str],
        unknown: list[str],
        bad: str,
        good: str,
        opts: RuntimeOptions,
        evidence: dict[str, str],
    ) -> Finding:
        if not problems and unknown:  # no evidence either way: the count stays as it was
            return Finding(
                component,
                condition,
                Status.UNKNOWN,
                "ToolFailed",
                "; ".join(unknown),
                evidence=evidence | {"tool_failures": "; ".join(unknown)},
            )
        if not problems:
            self._failures[component] = 0
            return Finding(
                component, condition, Status.OK, good, f"{component} is healthy", evidence=evidence
            )
        n = self._failures[component] = self._failures.get(component, 0) + 1
        message = "; ".join(problems)
        evidence = evidence | {"problems": message, "failed_polls": str(n)}
        if n < opts.polls:  # not yet: it may be restarting; neither healthy nor faulty
            return Finding(
                component,
                condition,
                Status.UNKNOWN,
                "NotAnswering",
                f"{message} ({n} of {opts.polls} polls)",
                evidence=evidence,
            )
        return Finding(component, condition, Status.FAULT, bad, message, opts.action, evidence)

    # ---- exhaustion ---------------------------------------------------------------------------

    def _exhaustion(self, opts: RuntimeOptions) -> list[Finding | None]:
        out: list[Finding | None] = []
        try:  # loadavg's 4th field: runnable/total scheduling entities (each holds a PID)
            total = int(self.ctx.path("/proc/loadavg").read_text().split()[3].split("/")[1])
            pid_max = int(self.ctx.path("/proc/sys/kernel/pid_max").read_text())
            out.append(
                graded(
                    "node",
                    "PidExhaustion",
                    "Pids",
                    100.0 * total / pid_max,
                    opts.pid_warn_percent,
                    opts.pid_fail_percent,
                    opts.exhaustion_action,
                    f"{total} of {pid_max} PIDs in use",
                    {"in_use": total, "pid_max": pid_max},
                )
            )
        except (OSError, ValueError, IndexError):
            pass
        try:  # file-nr: allocated, allocated-but-unused, maximum
            allocated, unused, maximum = (
                int(x) for x in self.ctx.path("/proc/sys/fs/file-nr").read_text().split()
            )
            in_use = allocated - unused
            out.append(
                graded(
                    "node",
                    "FileDescriptorExhaustion",
                    "FileDescriptors",
                    100.0 * in_use / maximum,
                    opts.fd_warn_percent,
                    opts.fd_fail_percent,
                    opts.exhaustion_action,
                    f"{in_use} of {maximum} file handles in use",
                    {"in_use": in_use, "max": maximum},
                )
            )
        except (OSError, ValueError, ZeroDivisionError):
            pass
        return out


def _h2_answers(path: str, timeout: float) -> str | None:
    """None when an HTTP/2 server answers on the unix socket; else what went wrong."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(H2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = s.recv(9 - len(header))
                if not chunk:
                    return "connection closed before any frame"
                header += chunk
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    if header[3] != H2_SETTINGS:
        return f"answered a frame of type {header[3]}, not SETTINGS"
    return None


def _healthz(url: str, timeout: float) -> list[str]:
    """What is wrong with kubelet's /healthz: nothing when it says `ok`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(256).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        return [f"kubelet /healthz answered {exc.code}"]
    except OSError as exc:
        why = getattr(exc, "reason", exc)
        return [f"kubelet /healthz: {getattr(why, 'strerror', None) or why}"]
    return [] if body == "ok" else [f"kubelet /healthz said {body!r}"]


async def _crictl_problems(crictl: str, sock: str, timeout: float) -> tuple[list[str], str | None]:
    """`crictl info`: the CRI status conditions that are not true, and why it told us nothing
    (the socket answered already: a crictl that failed is no evidence against the runtime)."""
    try:
        out = await run_command([crictl, "--runtime-endpoint", f"unix://{sock}", "info"], timeout)
    except OSError as exc:
        return [], f"crictl info could not start: {exc}"
    if out.failure is not None:
        return [], out.failure
    if out.returncode != 0:
        return [], f"crictl info exited {out.returncode}: {out.stderr.strip()[:200]}"
    try:
        conditions = json.loads(out.stdout)["status"]["conditions"]
        return [
            f"{c['type']} is false: {c.get('reason') or ''} {c.get('message') or ''}".strip()
            for c in conditions
            if c.get("status") is not True
        ], None
    except (ValueError, KeyError, TypeError, AttributeError):
        return [], "crictl info printed something that is not its JSON status"
