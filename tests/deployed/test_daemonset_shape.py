"""The agent run the way deploy/daemonset.yaml runs it, on a fake host, end to end.

Everything about the container comes from the rendered manifests (`kubectl kustomize deploy/`):
its volume mounts (hostPath, configMap, emptyDir; read-only or not), its user and groups, the
read-only root filesystem, the dropped capabilities and its environment. A private mount, PID
and network namespace (`unshare`, as root) holds a container root: this machine's /usr (the
image's libraries) and the installed agent, read-only, with the pod's volumes mounted where the
pod has them; the hostPath volumes come from a fake host tree built from fixtures. The agent
(`node-health run` of the venv) then runs in it as the pod's user. Nothing outside the
namespace is mounted or changed, and the machine's own /dev/kmsg is never opened: the fake
host's stands in for it, closed to the pod's user as `kernel.dmesg_restrict=1` closes it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"
HEALTHY_HOST = FIXTURES / "hosts" / "ubuntu-netdata9585"
KERNEL_DOC = FIXTURES / "hosts" / "kernel-doc"
HEALTHY_LOG = FIXTURES / "kernel" / "benign" / "gpu-node-journal-gpud1209.log"
XID79_LOG = FIXTURES / "kernel" / "syslog" / "xid79-traditional-acer-po5-650.log"
HEALTH = "sagemaker.amazonaws.com/node-health-status"
NODE = "ip-10-1-2-3.ec2.internal"
ADM = 4  # Debian's adm group: owns /var/log/kern.log


def _namespaces_refused() -> str | None:
    """Why this machine cannot run the harness, or None when it can."""
    if sys.platform != "linux":
        return "Linux namespaces only"
    if os.geteuid() != 0:
        return "needs root for mount namespaces and for switching to the pod's user"
    for tool in ("unshare", "setpriv", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--net", "--pid", "--fork", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"namespaces refused here: {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif((reason := _namespaces_refused()) is not None, reason=reason or "")


def rendered() -> tuple[dict[str, Any], dict[str, Any]]:
    """The DaemonSet and its ConfigMap as `kubectl kustomize deploy/` builds them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (.ci/run installs it)")
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO / "deploy")], capture_output=True, text=True, check=True
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return ds, cm


def fake_host(root: Path) -> Path:
    """A healthy GPU node's filesystem: its mount table, memory, counters, kernel log."""
    proc = root / "proc"
    shutil.copytree(HEALTHY_HOST / "proc", proc)
    shutil.copytree(KERNEL_DOC / "proc", proc, dirs_exist_ok=True)
    (proc / "sys/kernel/random").mkdir(parents=True)
    (proc / "sys/kernel/random/boot_id").write_text("0f1d5b8e-5f2c-4a55-9d4b-2c1c3f0e7a61\n")
    (proc / "sys/kernel/pid_max").write_text("4194304\n")
    (proc / "sys/fs").mkdir(parents=True)
    (proc / "sys/fs/file-nr").write_text("4096\t0\t9223372036854775807\n")
    (proc / "loadavg").write_text("0.12 0.08 0.05 2/845 32113\n")
    (proc / "stat").write_text(f"cpu  1 2 3 4\nbtime {int(time.time()) - 3600}\n")
    # As on a real procfs, `self` is whoever reads it and `mounts` goes through it: inside
    # the container, the agent's own mount namespace.
    (proc / "self").symlink_to("/proc/self")
    (proc / "mounts").symlink_to("self/mounts")
    (root / "sys").mkdir()
    (root / "dev").mkdir()
    kmsg = root / "dev/kmsg"
    kmsg.write_text("")
    kmsg.chmod(0o600)  # root's: the pod's user may not read it
    log = root / "var/log"
    log.mkdir(parents=True)
    shutil.copy(HEALTHY_LOG, log / "kern.log")
    os.chown(log / "kern.log", 0, ADM)
    (log / "kern.log").chmod(0o640)
    return root


def _env(container: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = NODE
        else:
            raise AssertionError(f"env {var['name']}: the harness does not know {var}")
    return {**extra, **env}


def container_script(
    ds: dict[str, Any], cm: dict[str, Any], host: Path, work: Path, agent: list[str]
) -> tuple[str, dict[str, Any]]:
    """The shell script that builds the container and execs the agent in it, run inside the
    private namespaces; and the pod's security settings it applied."""
    pod = ds["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "agent"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    user, group = psc.get("runAsUser", csc.get("runAsUser")), psc.get("runAsGroup", 0)
    assert user not in (None, 0), "the agent's container must run as a non-root user"
    groups = [group, *psc.get("supplementalGroups", [])]
    root = work / "root"
    root.mkdir()
    config = work / "config"
    config.mkdir()
    for name, text in cm["data"].items():
        (config / name).write_text(text)
    cmd = [f"mount -t tmpfs -o mode=755 container-root {q(root)}"]
    for m in sorted(container["volumeMounts"], key=lambda m: m["mountPath"].count("/")):
        vol = volumes[m["name"]]
        target = root / m["mountPath"].lstrip("/")
        if "emptyDir" in vol:
            size = vol["emptyDir"].get("sizeLimit", "16Mi").replace("Mi", "m")
            cmd += [
                f"mkdir -p {q(target)}",
                f"mount -t tmpfs -o size={size},mode=1777 tmpfs {q(target)}",
            ]
            continue
        if "configMap" in vol:
            source = config
        else:
            source = host / vol["hostPath"]["path"].lstrip("/")
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                source.mkdir(parents=True, exist_ok=True)
        make = "touch" if source.is_file() else "mkdir -p"
        cmd += [f"mkdir -p {q(target.parent)}", f"{make} {q(target)}"]
        cmd.append(f"mount --bind {q(source)} {q(target)}")
        if m.get("readOnly"):
            cmd.append(f"mount -o remount,bind,ro {q(target)}")
    # The image after the volumes: a checkout under /tmp (CI's may be) would otherwise be
    # hidden by the pod's /tmp emptyDir. This machine's /usr and interpreter, the installed agent.
    cmd += [*_image(root), f"mount -t proc proc {q(root / 'proc')}"]
    if csc.get("readOnlyRootFilesystem"):
        cmd.append(f"mount -o remount,bind,ro {q(root)}")
    drop = csc.get("capabilities", {}).get("drop", [])
    assert drop == ["ALL"], "the harness drops every capability, as the pod spec must"
    env = _env(
        container,
        {"PATH": f"{Path(agent[0]).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp"},
    )
    setpriv = [
        "setpriv",
        f"--reuid={user}",
        f"--regid={group}",
        f"--groups={','.join(str(g) for g in groups)}",
        "--inh-caps=-all",
        "--bounding-set=-all",
        *(["--no-new-privs"] if csc.get("allowPrivilegeEscalation") is False else []),
    ]
    argv = [
        *setpriv,
        "env",
        "-i",
        *(f"{k}={v}" for k, v in env.items()),
        *agent,
        *container["args"],
    ]
    cmd.append(f"exec chroot {q(root)} {shlex.join(argv)}")
    return "set -eu\n" + "\n".join(cmd) + "\n", {"user": user, "groups": groups}


def q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _image(root: Path) -> list[str]:
    """Mounts that make `root` look like the image: /usr, the interpreter and the repository
    (where the venv is), read-only; /bin, /lib... as this machine has them; a few of /etc."""
    cmd: list[str] = []
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        real = Path("/") / top
        if real.is_symlink():
            cmd.append(f"ln -s {q(os.readlink(real))} {q(root / top)}")
        elif real.is_dir():
            cmd += _ro_bind(real, root)
    chosen: list[Path] = []
    for source in (Path("/usr"), Path(sys.base_prefix), REPO, Path(sys.prefix)):
        if not any(source.is_relative_to(c) for c in chosen):
            chosen.append(source)
            cmd += _ro_bind(source, root)
    cmd.append(f"mkdir -p {q(root / 'etc')} {q(root / 'dev')} {q(root / 'proc')}")
    for name in ("passwd", "group", "nsswitch.conf", "hosts", "ld.so.cache"):
        if (Path("/etc") / name).exists():
            cmd.append(f"cp /etc/{name} {q(root / 'etc' / name)}")
    for dev in ("null", "zero", "full", "random", "urandom"):
        cmd += [
            f"touch {q(root / 'dev' / dev)}",
            f"mount --bind /dev/{dev} {q(root / 'dev' / dev)}",
        ]
    return list(dict.fromkeys(cmd))


def _ro_bind(source: Path, root: Path) -> list[str]:
    target = root / str(source).lstrip("/")
    if source.is_symlink():
        return [f"mkdir -p {q(target.parent)}", f"ln -s {q(os.readlink(source))} {q(target)}"]
    if source.is_dir() and source.stat().st_mode & 0o005 != 0o005:
        # A directory others may not enter (a checkout in mktemp's 0700 one): its entries one
        # by one, under a directory of the container's own, as an image would have them.
        entries = sorted(source.iterdir())
        return [f"mkdir -p {q(target)}", *(c for e in entries for c in _ro_bind(e, root))]
    if source.is_dir():
        make = f"mkdir -p {q(target)}"
    else:
        make = f"mkdir -p {q(target.parent)}; touch {q(target)}"
    return [
        make,
        f"mount --rbind {q(source)} {q(target)}",
        f"mount -o remount,bind,ro {q(target)}",
    ]


class Pod:
    """The agent running in its container; its stdout (events) and stderr (logs) in files."""

    def __init__(self, work: Path, script: str, host: Path) -> None:
        self.host = host
        self.state = host / "var/lib/node-health"
        self.out, self.err = work / "stdout", work / "stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--net",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--propagation",
                    "private",
                    "bash",
                    "-c",
                    script,
                ],
                stdout=out,
                stderr=err,
            )

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.out.read_text().splitlines() if ln.startswith("{")]

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.err.read_text().splitlines() if ln.startswith("{")]

    def node_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state / "node-state.json").read_text())
        except (OSError, ValueError):
            return None

    def until(self, what: str, predicate: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        return self.err.read_text()[-3000:]

    def stop(self) -> int:
        """SIGTERM to the agent (PID 1 of the pod's namespace), as the kubelet sends it."""
        if self.proc.poll() is None:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                for pid in children.read_text().split():
                    os.kill(int(pid), signal.SIGTERM)
            except OSError:
                self.proc.kill()  # and --kill-child takes the agent with it
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    ds, cm = rendered()
    host = fake_host(tmp_path / "host")
    state = host / "var/lib/node-health"
    state.mkdir(parents=True)
    agent = [str(Path(sys.executable).parent / "node-health")]
    assert Path(agent[0]).is_file(), "the agent is not installed in this venv"
    script, who = container_script(ds, cm, host, tmp_path, agent)
    os.chown(state, who["user"], who["groups"][0])  # the init container's chown
    running = Pod(tmp_path, script, host)
    try:
        yield running
    finally:
        running.stop()


def statuses(events: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Each check's reported statuses (the verdict's own events carry none)."""
    out: dict[str, set[str]] = {}
    for e in events:
        if "status" in e:
            out.setdefault(e["check"], set()).add(e["status"])
    return out


def test_the_agent_as_deployed_keeps_a_healthy_node_and_takes_out_a_dead_gpu(pod: Pod) -> None:
    pod.until(
        "every check's first result",
        lambda: any(ln["event"] == "first_round_done" for ln in pod.logs()),
    )
    state = pod.node_state()
    assert state is not None and state["labels"][HEALTH] == "Schedulable", pod.tail()
    assert not state["taints"]
    logs = pod.logs()
    [started] = [ln for ln in logs if ln["event"] == "agent_started"]
    assert {"disk", "kernel_log", "memory", "runtime"} <= set(started["checks"])
    # Every check ran in the container's shape (read-only root, the pod's user, no
    # capabilities) to ok or unknown, or was skipped for what this host lacks; never a fault.
    healthy = statuses(pod.events())
    assert set(healthy) <= set(started["checks"])
    assert all(s <= {"ok", "unknown"} for s in healthy.values()), healthy
    root = [e for e in pod.events() if e.get("component") == "fs:/"]
    assert [(e["condition"], e["status"]) for e in root] == [("ReadonlyFilesystem", "ok")]
    # /dev/kmsg is closed to the pod's user: the kernel log is read from kern.log instead
    [source] = [ln for ln in logs if ln["event"] == "kernel_log_source"]
    assert source["source"] == "file"
    assert "Permission denied" in source["passed_over"]["kmsg"]

    with open(pod.host / "var/log/kern.log", "a") as kern:
        kern.write(XID79_LOG.read_text().splitlines()[0] + "\n")
    pod.until(
        "UnschedulablePendingReplacement",
        lambda: (
            (pod.node_state() or {}).get("labels", {}).get(HEALTH)
            == "UnschedulablePendingReplacement"
        ),
    )
    assert pod.stop() == 0
    faults = [e for e in pod.events() if e.get("status") == "fault"]
    assert [(e["check"], e["reason"], e["evidence"]["xid"], e["action"]) for e in faults] == [
        ("kernel_log", "XidHardwareFailure", "79", "replace")
    ]
    failed = [ln for ln in pod.logs() if ln["event"] in ("check_failed", "stream_failed")]
    assert failed == []
