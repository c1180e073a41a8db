"""`node-health scan` on saved tool outputs of every kind it knows (verbatim fixtures)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from agent import scan as scan_module
from agent import tool_outputs
from checks.api import Status
from checks.instance_types import expected
from checks.nvidia import smi

FIXTURES = Path(__file__).parent / "fixtures"


def scan(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> tuple[int, list, str]:
    code = scan_module.main([str(path), *args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize(
    ("fixture", "kind"),
    [
        ("dcgm/nvvs-per-gpu.json", "dcgmi diag"),
        ("dcgm/r2-gpu-memory-fail.txt", "dcgmi diag"),
        ("nccl/p5-2node-srun.txt", "all_reduce_perf"),
        ("neuron/neuron-ls-trn2n-48xlarge-header.txt", "neuron-ls"),
        ("efa/fi_info-p4de-4-devices.txt", "fi_info"),
        ("efa/fi_info-no-efa.txt", "fi_info"),
        ("nvidia-smi/nvlink-e-h100-elided.txt", "nvidia-smi nvlink -e"),
        ("neuron/nccom-test-allr-2ranks.txt", "nccom-test"),
        ("neuron/nccom-test-failed.txt", "nccom-test"),
        ("nvidia-smi/q-remapped-rows-pending.txt", "nvidia-smi -q"),
        ("nvidia-smi/q-gtx960m-header-cut.txt", "nvidia-smi -q"),
        ("nvidia-smi/q-retired-pages-pending-blacklist-mle.txt", "nvidia-smi -q"),
        ("nvidia-smi/table-err-gpu-operator559-cut.txt", "nvidia-smi"),
        ("nvidia-smi/table-inforom-corrupted-gpu-operator-docs.txt", "nvidia-smi"),
        ("nvidia-smi/no-handle-xxd3vin19.txt", "nvidia-smi"),
        ("nvidia-smi/no-devices-pytorch167118.txt", "nvidia-smi"),
        ("nvidia-smi/nvlink-s-inactive-azhpc73.txt", "nvidia-smi nvlink -s"),
        ("nvidia-smi/nvlink-s-all-inactive-gpud1085.txt", "nvidia-smi nvlink -s"),
        ("nccl/nvls-present-state-nccl1788.txt", "all_reduce_perf"),
    ],
)
def test_each_kind_is_recognised(fixture: str, kind: str) -> None:
    found = tool_outputs.recognise((FIXTURES / fixture).read_text())
    assert found is not None and found.name == kind


def test_a_kernel_log_is_no_tool_output() -> None:
    for log in (FIXTURES / "kernel" / "faults").glob("*.log"):
        assert tool_outputs.recognise(log.read_text()) is None, log.name


@pytest.mark.parametrize(
    ("fixture", "itype", "rc", "reason"),
    [
        ("neuron/neuron-ls-trn2n-48xlarge.txt", "trn2n.48xlarge", 0, "NeuronDevicesPresent"),
        # Fewer devices than the type has: a saved list cut where an entry ends looks the
        # same, so it is said, not acted on.
        ("neuron/neuron-ls-inf1-6xlarge-procs.txt", "trn2.48xlarge", 2, "SavedListShort"),
        ("efa/fi_info-p4de-4-devices.txt", "p4de.24xlarge", 0, "EfaDevicesPresent"),
        ("efa/fi_info-p4de-4-devices.txt", "p5.48xlarge", 2, "SavedListShort"),
        ("efa/fi_info-no-efa.txt", None, 2, "NoEfaProvider"),
        ("nvidia-smi/nvlink-e-h100-elided.txt", None, 0, "NvlinkClean"),
        # The default table: a GPU whose cells read ERR! (a query of it failed), reboot...
        ("nvidia-smi/table-err-gpu-operator559-cut.txt", None, 1, "GpuQueryFailed"),
        # ...a corrupted infoROM, replace (NVIDIA's GPU Operator troubleshooting)...
        ("nvidia-smi/table-inforom-corrupted-gpu-operator-docs.txt", None, 1, "InfoROMCorrupted"),
        # ...a GPU nvidia-smi has no handle for, reboot.
        ("nvidia-smi/no-handle-nvidia-docker1553.txt", None, 1, "GpuUnreachable"),
        ("nvidia-smi/no-handle-xxd3vin19.txt", None, 1, "GpuUnreachable"),
        # No GPU at all: a fault only where the instance type has GPUs.
        ("nvidia-smi/no-devices-pytorch167118.txt", "p5.48xlarge", 1, "NoGpusFound"),
        ("nvidia-smi/no-devices-pytorch167118.txt", None, 2, "NoGpusFound"),
        # nvlink -s: an inactive link among active ones is a fault whatever the type...
        ("nvidia-smi/nvlink-s-inactive-azhpc73.txt", None, 1, "NvlinkInactive"),
        # ...all of a GPU's links inactive, only where the type has NVLink (a PCIe GPU has none).
        ("nvidia-smi/nvlink-s-all-inactive-gpud1085.txt", "p5.48xlarge", 1, "NvlinkInactive"),
        ("nvidia-smi/nvlink-s-all-inactive-gpud1085.txt", None, 2, "NvlinkInactive"),
        ("nvidia-smi/q-retired-pages-pending-blacklist-mle.txt", None, 1, "PageRetirementPending"),
        ("nvidia-smi/q-a100-sram-row-remap-pending-mle.txt", None, 1, "RowRemapPending"),
    ],
)
def test_verdicts(
    capsys: pytest.CaptureFixture[str], fixture: str, itype: str | None, rc: int, reason: str
) -> None:
    args = ["--instance-type", itype] if itype else []
    code, events, _ = scan(capsys, FIXTURES / fixture, *args)
    assert code == rc
    assert reason in {e["reason"] for e in events}


def test_neuron_monitor_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    hardware = (FIXTURES / "neuron" / "neuron-monitor-hardware-info-fragment.txt").read_text()
    counters = (FIXTURES / "neuron" / "neuron-monitor-hw-counters-fragment.txt").read_text()
    doc = json.loads("{" + hardware + ', "system_data": {' + counters.rstrip().rstrip(",") + "}}")
    doc["system_data"]["neuron_hw_counters"]["neuron_devices"][0]["mem_ecc_uncorrected"] = 3
    saved = tmp_path / "monitor.json"
    saved.write_text(json.dumps(doc) + "\n")
    code, events, err = scan(capsys, saved, "--instance-type", "trn2n.48xlarge")
    assert code == 1 and "(neuron-monitor)" in err
    assert [e["reason"] for e in events] == ["NeuronUncorrectableEcc"]


def test_nvlink_counters_are_events_not_node_actions() -> None:
    text = (FIXTURES / "nvidia-smi" / "nvlink-e-h100-elided.txt").read_text()
    text = text.replace("Link 17: CRC Errors: 0", "Link 17: CRC Errors: 12")
    [f] = smi.judge_nvlink_errors(text)
    assert (f.status, f.reason, f.action.value) == (Status.FAULT, "NvlinkErrorCounters", "none")
    assert f.evidence == {"Link 17 CRC Errors": 12} and f.component == "gpu:0:nvlink"
    assert smi.parse_nvlink_errors(text)["GPU 0"]["Link 1"] == {
        "Replay Errors": 0,
        "Recovery Errors": 0,
        "CRC Errors": 0,
    }


@pytest.mark.parametrize(
    ("change", "reason", "action"),
    [
        (None, "RowRemapPending", "reboot"),
        (
            (
                "        Pending                           : Yes",
                "        Pending                           : No\n"
                "        Remapping Failure Occurred        : Yes",
            ),
            "RowRemapFailure",
            "replace",
        ),
    ],
)
def test_smi_q_remapped_rows(change, reason: str, action: str) -> None:
    text = (FIXTURES / "nvidia-smi" / "q-remapped-rows-pending.txt").read_text()
    if change:
        text = text.replace(*change)
    [f] = smi.judge_smi_q(text)
    assert (f.status, f.reason, f.action.value) == (Status.FAULT, reason, action)


def test_smi_q_volatile_sram_uncorrectable_means_reboot() -> None:
    text = (FIXTURES / "nvidia-smi" / "q-a100-sram-row-remap-pending-mle.txt").read_text()
    text = text.replace(
        "Pending                           : Yes", "Pending                           : No"
    )
    [clean] = smi.judge_smi_q(text)
    assert clean.status is Status.OK
    volatile, aggregate = text.split("        Aggregate\n")
    counted = volatile.replace(
        "SRAM Uncorrectable            : 0", "SRAM Uncorrectable            : 2"
    )
    [f] = smi.judge_smi_q(counted + "        Aggregate\n" + aggregate)
    assert (f.reason, f.action.value) == ("VolatileUncorrectableEcc", "reboot")
    # Counted since the GPU was first used, not since the driver loaded: no action.
    old = aggregate.replace(
        "SRAM Uncorrectable            : 0", "SRAM Uncorrectable            : 2"
    )
    [f] = smi.judge_smi_q(volatile + "        Aggregate\n" + old)
    assert f.status is Status.OK


def test_smi_table_details() -> None:
    err = (FIXTURES / "nvidia-smi" / "table-err-gpu-operator559-cut.txt").read_text()
    [f] = smi.judge_smi(err, expected(None))
    assert f.component == "gpu:0000:19:00" and f.action.value == "reboot"  # GPU 1 is fine
    inforom = FIXTURES / "nvidia-smi" / "table-inforom-corrupted-gpu-operator-docs.txt"
    head = inforom.read_text().split("WARNING")[0]
    [ok] = smi.judge_smi(head, expected(None))
    assert (ok.status, ok.reason) == (Status.OK, "GpuHealthy")


def test_nvlink_status_gaps_and_short_lists() -> None:
    text = (FIXTURES / "nvidia-smi" / "nvlink-s-inactive-azhpc73.txt").read_text()
    up = text.replace("<inactive>", "25.781 GB/s")
    [ok] = smi.judge_nvlink_status(up, expected(None))
    assert (ok.status, ok.reason) == (Status.OK, "NvlinkActive")
    # One V100's links of an 8-GPU type: the list may be cut, so it is said, not acted on.
    [short] = smi.judge_nvlink_status(up, expected("p4d.24xlarge"))
    assert (short.status, short.reason) == (Status.UNKNOWN, "SavedListShort")
    # GPU 3 then GPU 5 with nothing between: GPU 4 is missing.
    block = up.split("....\n")[1]
    gap = block + block.replace("GPU 3:", "GPU 5:")
    [missing] = smi.judge_nvlink_status(gap, expected(None))
    assert (missing.reason, missing.component, missing.action.value) == (
        "GpuMissing",
        "gpu:4",
        "reboot",
    )
    # An elision between them ("....") is a paste, not a missing GPU.
    [elided] = smi.judge_nvlink_status(
        block + "....\n" + block.replace("GPU 3:", "GPU 5:"), expected(None)
    )
    assert elided.status is Status.OK


def test_smi_q_reset_status_and_gpu_headers() -> None:
    cut = (FIXTURES / "nvidia-smi" / "q-a100-reset-status-cut.txt").read_text()
    [ok] = smi.judge_smi_q(cut)
    assert (ok.status, ok.reason) == (Status.OK, "GpuHealthy")
    head = (FIXTURES / "nvidia-smi" / "q-gtx960m-header-cut.txt").read_text()
    reset = head + "    GPU Reset Status\n        Reset Required                    : Yes\n"
    [f] = smi.judge_smi_q(reset)
    assert (f.component, f.reason, f.action.value) == (
        "gpu:0000:01:00",
        "GpuResetRequired",
        "reboot",
    )
    [unjudged] = smi.judge_smi_q(head)
    assert unjudged.status is Status.UNKNOWN


def test_scan_stays_free_of_the_checks_heavy_imports() -> None:
    # Start-up is most of a scan's time (benchmarks/kernel_log.py): the tool-output parsers
    # must not pull in pydantic or asyncio with the checks that use them.
    import subprocess
    import sys

    code = (
        "import sys, agent.scan; "
        "print(sorted(m for m in ('pydantic', 'asyncio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_hyperscan_the_same_sections_are_found(monkeypatch) -> None:
    """Where hyperscan cannot be imported (it is built for x86-64 only), the markers' words are
    found a `find` pass each: every fixture, and every two of them end to end, splits alike."""
    import re

    kernel_line = re.compile(rb"^\[ *\d+\.\d+\]", re.M)
    files = sorted(p for p in (Path(__file__).parent / "fixtures").rglob("*") if p.is_file())
    inputs = [p.read_bytes() for p in files]
    inputs += [a + b"\n" + b for a, b in itertools.pairwise(inputs)]

    def split() -> list[list[tuple[str, int, int]]]:
        return [
            [(s.kind.name, s.start, s.end) for s in tool_outputs.sections(buf, kernel_line)]
            for buf in inputs
        ]

    fast = split()
    monkeypatch.setattr(tool_outputs, "_LOCATE", None)
    assert split() == fast
    assert sum(map(len, fast)) > 50  # the fixtures hold tool outputs to split
