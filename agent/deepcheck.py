"""`node-health deep-check`: HyperPod's InstanceStress on one node, with a verdict.

The tests run one after another, each bounded by its own timeout and all by one deadline;
each is judged by the same parsers `scan` uses. A tool that is not installed is skipped and
says so. While the run lasts the node is `Unschedulable` with deep-health-check-status
`InProgress`; then `Passed` (Schedulable), or `Failed` with the reboot or replacement the worst
finding asks for. A run that could not judge the node (nothing ran, or every test that ran
was inconclusive) puts the labels back as they were: an unknown is never a fault.
"""

from __future__ import annotations

import asyncio
import enum
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.events import rfc3339
from agent.identity import Identity
from agent.models import NodeKeys
from agent.nodestate import LocalStateFile, NodeState, relabel
from agent.policy import Verdict
from checks import neuron_output as neuron
from checks.api import Action, Finding, Status
from checks.efa import loopback
from checks.efa_output import judge_fi_info, parse_fi_info
from checks.instance_types import expected
from checks.nvidia import dcgm, nccl
from checks.proc import CommandResult, run_command

# dcgmi diag levels take seconds, ~2 minutes, ~15 minutes and over an hour (dcgmi-diag docs).
DCGM_TIMEOUTS = {1: 300.0, 2: 900.0, 3: 3600.0, 4: 4 * 3600.0}
# stress-ng's exit statuses (stress-ng.h): 2 is "one or more stressors failed".
STRESS_NG_FAILED = 2


class Outcome(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # ran, but could not judge the node (crash, timeout, busy GPU)
    SKIPPED = "skipped"  # did not run (tool missing, no GPUs, deadline)


@dataclass(frozen=True)
class Step:
    """One command and its judge; or, for a test of several commands, `execute`."""

    name: str
    argv: list[str]
    timeout: float
    judge: Callable[[CommandResult], list[Finding]] = lambda r: []
    execute: Callable[[float], Awaitable[list[Finding]]] | None = None
    # the performance figures the output shows, for the fleet's comparison (controller)
    figures: Callable[[CommandResult | None, list[Finding]], dict[str, float]] | None = None


@dataclass
class StepResult:
    name: str
    outcome: Outcome
    message: str
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def action(self) -> Action:
        return max((f.action for f in self.findings), key=lambda a: a.rank, default=Action.NONE)

    def line(self) -> dict[str, Any]:
        """The test's line in the JSON output and the on-node log."""
        return {
            "test": self.name,
            "result": str(self.outcome),
            "seconds": round(self.seconds, 1),
            "action": str(self.action),
            "message": self.message,
            **({"figures": self.figures} if self.figures else {}),
        }


@dataclass(frozen=True)
class Options:
    suite: str = "stress"  # stress | all
    level: int = 2
    instance_type: str | None = None
    gpus: int | None = None  # GPUs on this node; default: the instance type's
    stress_seconds: int = 60
    nccl_max_bytes: int = 1 << 30


def plan(
    opts: Options, which: Callable[[str], str | None] = shutil.which
) -> tuple[list[Step], list[StepResult]]:
    """The tests to run on this node, and those skipped with the reason."""
    steps: list[Step] = []
    skipped: list[StepResult] = []
    gpus = opts.gpus if opts.gpus is not None else expected(opts.instance_type).gpus

    def want(name: str, tool: str, build: Callable[[str], Step]) -> None:
        path = which(tool)
        if path is None:
            skipped.append(StepResult(name, Outcome.SKIPPED, f"{tool} not found"))
        else:
            steps.append(build(path))

    want(
        "stress-ng",
        "stress-ng",
        lambda exe: Step(
            "stress-ng",
            [
                exe,
                "--cpu",
                "0",
                "--vm",
                "2",
                "--vm-bytes",
                "50%",
                "--hdd",
                "1",
                "--verify",
                "--timeout",
                f"{opts.stress_seconds}s",
                "--metrics-brief",
            ],
            opts.stress_seconds + 120.0,
            _judge_stress_ng,
        ),
    )
    if gpus is None and expected(opts.instance_type).neuron_devices:
        # a Neuron type has no GPUs: DCGM could only fail to find them (the deep-check image
        # carries dcgmi for every node), and an unknown would stop the run from passing
        skipped.append(StepResult("dcgm-diag", Outcome.SKIPPED, "no GPUs on a Neuron type"))
    else:
        want(
            "dcgm-diag",
            "dcgmi",
            lambda exe: Step(
                "dcgm-diag",
                [exe, "diag", "-r", str(opts.level), "-j"],
                DCGM_TIMEOUTS[opts.level],
                lambda r: dcgm.judge(dcgm.parse(r.stdout), r.returncode),
                figures=lambda r, _: dcgm.figures(dcgm.parse(r.stdout)) if r else {},
            ),
        )
    if gpus is None or gpus < 1:
        skipped.append(
            StepResult("nccl-allreduce", Outcome.SKIPPED, "no GPU count (--gpus or a known type)")
        )
    else:
        threshold = nccl.threshold_for(opts.instance_type)
        want(
            "nccl-allreduce",
            "all_reduce_perf",
            lambda exe: Step(
                "nccl-allreduce",
                [exe, "-b", "8", "-e", str(opts.nccl_max_bytes), "-f", "2", "-g", str(gpus)],
                1200.0,
                lambda r: nccl.judge(nccl.parse(r.stdout + r.stderr), threshold, r.returncode),
                figures=lambda r, _: nccl_figures(r.stdout + r.stderr) if r else {},
            ),
        )
    if expected(opts.instance_type).neuron_devices or which("nccom-test"):
        want(
            "nccom-test",
            "nccom-test",
            lambda exe: Step(
                "nccom-test",
                [exe, "-r", "2", "allr"],
                600.0,
                lambda r: [neuron.judge_nccom(r.stdout + r.stderr, r.returncode)],
            ),
        )
    if opts.suite == "all":
        efa = expected(opts.instance_type).efa_devices
        want(
            "efa-devices",
            "fi_info",
            lambda exe: Step(
                "efa-devices",
                [exe, "-p", "efa", "-t", "FI_EP_RDM"],
                60.0,
                lambda r: [judge_fi_info(r.stdout + r.stderr, efa, r.returncode)],
            ),
        )
        fi_info = which("fi_info")
        want(
            "efa-loopback",
            "fi_pingpong",
            lambda exe: Step(
                "efa-loopback",
                [exe],
                60.0 * max(efa or 1, 1),
                execute=lambda timeout: _efa_loopback(fi_info, exe, timeout),
                figures=lambda _, found: efa_figures(found),
            ),
        )
    return steps, skipped


async def _efa_loopback(fi_info: str | None, fi_pingpong: str, timeout: float) -> list[Finding]:
    """fi_pingpong over each EFA device fi_info lists, one after another."""
    if fi_info is None:  # no device list to loop over: nothing judged
        return [
            Finding(
                "node",
                "EfaLoopback",
                Status.UNKNOWN,
                "NoEfaDeviceList",
                "fi_info not found: it lists the EFA devices to loop back over",
            )
        ]
    listed = await run_command([fi_info, "-p", "efa", "-t", "FI_EP_RDM"], 20)
    devices = parse_fi_info(listed.stdout)
    if not devices:
        return [
            judge_fi_info(listed.stdout + listed.stderr, None, listed.returncode, listed.failure)
        ]
    each = max(timeout / len(devices), 10.0)
    return [await loopback(fi_pingpong, dev, each) for dev in devices]


def _judge_stress_ng(r: CommandResult) -> list[Finding]:
    fails = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if " fail: " in ln][:5]
    if r.returncode == 0:
        status, reason, action, message = Status.OK, "StressPassed", Action.NONE, "stress-ng passed"
    elif r.returncode == STRESS_NG_FAILED:
        status, reason, action = Status.FAULT, "StressFailed", Action.REPLACE
        message = "stress-ng: a stressor failed" + (f": {fails[0]}" if fails else "")
    else:  # bad options, no resources, not implemented, signalled: not the hardware's doing
        status, reason, action = Status.UNKNOWN, "StressError", Action.NONE
        message = f"stress-ng could not run (exit status {r.returncode})"
    return [
        Finding(
            component="host:stress",
            condition="InstanceStress",
            status=status,
            reason=reason,
            message=message,
            action=action,
            evidence={"failures": fails},
            check="stress-ng",
        )
    ]


async def run_steps(
    steps: list[Step],
    deadline: float,
    progress: Callable[[str, StepResult | None], None] = lambda name, result: None,
) -> list[StepResult]:
    """Run the steps in order until the deadline (seconds); what the deadline cut is unknown
    (the one running) or skipped (those not started)."""
    results: list[StepResult] = []
    end = time.monotonic() + deadline
    for step in steps:
        left = end - time.monotonic()
        if left <= 0:
            cut = StepResult(step.name, Outcome.SKIPPED, "the run's deadline passed")
            progress(step.name, cut)
            results.append(cut)
            continue
        progress(step.name, None)
        result = await _run_step(step, min(step.timeout, left))
        progress(step.name, result)
        results.append(result)
    return results


async def _run_step(step: Step, timeout: float) -> StepResult:
    start = time.monotonic()
    timed_out = f"{step.name} timed out after {timeout:g}s and was stopped"
    r: CommandResult | None = None
    try:
        if step.execute is not None:
            try:
                async with asyncio.timeout(timeout):
                    findings = await step.execute(timeout)
            except TimeoutError:
                return StepResult(step.name, Outcome.UNKNOWN, timed_out, time.monotonic() - start)
        else:
            r = await run_command(step.argv, timeout)
            if r.timed_out:
                return StepResult(step.name, Outcome.UNKNOWN, timed_out, time.monotonic() - start)
            if r.failure is not None:  # killed, or left a process behind: nothing to judge
                return StepResult(step.name, Outcome.UNKNOWN, r.failure, time.monotonic() - start)
            try:
                findings = step.judge(r)
            except Exception as exc:  # a parser's bug judges nothing: the test is unknown
                why = f"cannot read the output of {step.argv[0]}: {type(exc).__name__}: {exc}"
                return StepResult(step.name, Outcome.UNKNOWN, why, time.monotonic() - start)
    except OSError as exc:
        return StepResult(step.name, Outcome.UNKNOWN, f"cannot start {step.argv[0]}: {exc}")
    took = time.monotonic() - start
    statuses = {f.status for f in findings}
    if any(f.status is Status.FAULT and f.action is not Action.NONE for f in findings):
        outcome = Outcome.FAILED
    elif Status.UNKNOWN in statuses:
        outcome = Outcome.UNKNOWN
    else:
        outcome = Outcome.PASSED
    lead = next(
        (f for f in findings if f.status is not Status.OK),
        findings[0] if findings else None,
    )
    message = lead.message if lead else f"{step.name}: no result"
    figures = step.figures(r, findings) if step.figures and outcome is not Outcome.UNKNOWN else {}
    return StepResult(step.name, outcome, message, took, findings, figures)


def nccl_figures(text: str) -> dict[str, float]:
    """all_reduce_perf's bus bandwidth (GB/s) at each message size, the better of out-of-place
    and in-place: `nccl_busbw_<bytes>`."""
    out = {}
    for row in nccl.parse(text).rows:
        measured = [b for b in row.busbw if b is not None]
        if measured:
            out[f"nccl_busbw_{row.size}"] = max(measured)
    return out


def efa_figures(findings: list[Finding]) -> dict[str, float]:
    """The EFA loopback's worst device: the lowest peak bandwidth (MB/s) and the highest best
    latency (microseconds) over the devices that passed."""
    passed = [f.evidence for f in findings if f.status is Status.OK and "max_mb_s" in f.evidence]
    if not passed:
        return {}
    return {
        "efa_loopback_mb_s": min(float(e["max_mb_s"]) for e in passed),
        "efa_loopback_usec": max(float(e["min_usec"]) for e in passed),
    }


def verdict(results: list[StepResult]) -> tuple[str, int, Verdict | None]:
    """(deep-health-check-status, exit status, node-health-status); None: leave it as it was."""
    failed = [r for r in results if r.outcome is Outcome.FAILED]
    if failed:
        worst = max((r.action for r in failed), key=lambda a: a.rank)
        node = Verdict.PENDING_REBOOT if worst is Action.REBOOT else Verdict.PENDING_REPLACEMENT
        return "Failed", 1, node
    ran = [r for r in results if r.outcome is Outcome.PASSED]
    if ran and not any(r.outcome is Outcome.UNKNOWN for r in results):
        return "Passed", 0, Verdict.SCHEDULABLE
    return "Unknown", 2, None


class Lifecycle:
    """The node labels of a deep check, written through the node-state file."""

    def __init__(self, writer: LocalStateFile, keys: NodeKeys) -> None:
        self.writer, self.keys = writer, keys
        self.before: NodeState = writer.read() or NodeState()

    async def start(self) -> None:
        await self._set(str(Verdict.UNSCHEDULABLE), "InProgress")

    async def finish(self, status: str, node: Verdict | None) -> None:
        if node is None:  # could not judge: back to what it was
            await self.writer.apply(self.before)
        else:
            await self._set(str(node), status)

    async def _set(self, health: str, deep: str) -> None:
        await self.writer.apply(relabel(self.before, self.keys, health=health, deep=deep))


def result_event(
    identity: Identity, status: str, results: list[StepResult], run_id: str
) -> dict[str, Any]:
    """The run's line in the DeepHealthCheckResults/<id> stream, worded as HyperPod's."""
    region, itype = identity.region or "unknown", identity.instance_type or "unknown"
    where = f"Region: {region}, InstanceType: {itype}"
    failed = [r for r in results if r.outcome is Outcome.FAILED]
    unknown = [r for r in results if r.outcome is Outcome.UNKNOWN]
    if failed:
        worst = max(failed, key=lambda r: r.action.rank)
        todo = "Reboot the Instance" if worst.action is Action.REBOOT else "Replace the Instance"
        level, msg = "error", f"Encountered FaultyInstance. {todo}. {where}. ERROR:{worst.message}"
    elif status == "Unknown":
        why = unknown[0].message if unknown else "no test could run"
        level, msg = "warn", f"Encountered UnknownError. {where}. ERROR: {why}"
    else:
        level, msg = "info", f"Deep health check passed. {where}."
    return {
        "level": level,
        "ts": rfc3339(time.time()),
        "msg": msg,
        "node": identity.node_name,
        "deep_health_check_id": run_id,
        "deep_health_check_status": status,
        "tests": [r.line() for r in results],
    }


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


async def accelerators_in_use(
    which: Callable[[str], str | None] = shutil.which,
    gpu_processes: Callable[[], int | None] | None = None,
) -> str | None:
    """What is using the GPUs or Neuron devices now, in words; None when nothing is (or
    nothing can tell). A deep check under a running job would fail for the job's sake."""
    count = await asyncio.to_thread(gpu_processes or _gpu_processes)
    if count:
        return f"{count} processes are using the GPUs"
    if (exe := which("neuron-ls")) is not None:
        r = await run_command([exe], 30)
        if r.ok and (pids := neuron.neuron_ls_processes(r.stdout)):
            return f"processes {', '.join(map(str, pids))} are using the Neuron devices"
    return None


def _gpu_processes() -> int | None:
    from checks.nvidia import nvml

    try:
        snap = nvml.PynvmlBackend().snapshot()
    except (ImportError, nvml.NvmlError):
        return None
    return sum(g.compute_processes or 0 for g in snap.gpus)


async def deep_check(
    opts: Options,
    identity: Identity,
    lifecycle: Lifecycle | None,
    deadline: float,
    progress: Callable[[str, StepResult | None], None],
) -> tuple[str, int, list[StepResult]]:
    steps, skipped = plan(opts)
    # SIGTERM stops the run as Ctrl-C does (asyncio.run cancels on SIGINT): by cancellation,
    # which kills every child (run_command) and puts the labels back.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    if lifecycle:
        await lifecycle.start()
    for r in skipped:
        progress(r.name, r)
    status, code, node = "Unknown", 2, None
    try:
        results = skipped + await run_steps(steps, deadline, progress)
        status, code, node = verdict(results)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if lifecycle:
            await asyncio.shield(lifecycle.finish(status, node))
    return status, code, results
