"""all_reduce_perf outputs (tests/fixtures/nccl, verbatim) read and judged as a node would be."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import scan as scan_module
from checks.api import Action, Status
from checks.nvidia import nccl

FIXTURES = Path(__file__).parent / "fixtures" / "nccl"
GIB = 1 << 30


def text(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_rows_are_read_by_header_through_srun_tags() -> None:
    run = nccl.parse(text("p5-2node-srun.txt"))
    assert len(run.rows) == 32
    assert run.rows[-1] == nccl.Row(17179869184, (487.09, 487.26), (0, 0))
    assert run.at(GIB) is not None and run.at(GIB).busbw == (436.95, 440.96)
    assert not run.complete


def test_mpirun_tags_elisions_and_summary() -> None:
    run = nccl.parse(text("p5-2node-mpirun.txt"))
    assert [r.size for r in run.rows][:2] == [0, 67108864]  # the "..." line is passed over
    assert (run.out_of_bounds, run.avg_busbw, run.complete) == (0, 52.9753, True)


def test_old_layout_and_not_checked_rows() -> None:
    old = nccl.parse(text("all_gather-out-of-bounds.txt"))
    assert old.rows[0].busbw == (129.05, 128.84) and old.out_of_bounds == 2
    na = nccl.parse(text("alltoall-na.txt"))
    assert na.rows[0].wrong == (0, None)


@pytest.mark.parametrize(
    ("fixture", "minimum", "exit_code", "status", "reason", "action"),
    [
        ("p5-2node-mpirun.txt", 250, 0, Status.OK, "NcclTestPassed", Action.NONE),
        ("p5-2node-mpirun.txt", 400, 0, Status.FAULT, "NcclLowBandwidth", Action.REPLACE),
        ("p5-2node-mpirun.txt", None, 0, Status.OK, "NcclTestPassed", Action.NONE),
        # A paste cut before the summary: no fault in it, and no pass.
        ("p5-2node-srun.txt", 250, None, Status.UNKNOWN, "NcclTestError", Action.NONE),
        ("p4de-2node-srun.txt", 80, None, Status.FAULT, "NcclLowBandwidth", Action.REPLACE),
        ("all_gather-out-of-bounds.txt", None, 0, Status.FAULT, "NcclWrongResults", Action.REPLACE),
        ("cuda-failure-mid-run.txt", 250, 1, Status.UNKNOWN, "NcclTestError", Action.NONE),
        ("init-failure.txt", None, 1, Status.UNKNOWN, "NcclTestError", Action.NONE),
        ("destroy-tail.txt", None, 0, Status.OK, "NcclTestPassed", Action.NONE),
        # Our own run exited 0 but printed no summary: it did not finish.
        ("p5-2node-srun.txt", 250, 0, Status.UNKNOWN, "NcclTestError", Action.NONE),
        # The table stops before the size the threshold is set for.
        ("alltoall-na.txt", 250, 0, Status.UNKNOWN, "NcclTestError", Action.NONE),
    ],
)
def test_verdicts(
    fixture: str,
    minimum: float | None,
    exit_code: int | None,
    status: Status,
    reason: str,
    action: Action,
) -> None:
    threshold = None if minimum is None else nccl.BusBandwidth(GIB, minimum)
    [f] = nccl.judge(nccl.parse(text(fixture)), threshold, exit_code)
    assert (f.status, f.reason, f.action) == (status, reason, action)


def test_low_bandwidth_is_worded_as_hyperpod_words_it() -> None:
    [f] = nccl.judge(nccl.parse(text("p4de-2node-srun.txt")), nccl.BusBandwidth(GIB, 80))
    assert f.message == (
        "Bandwidth has less than threshold: Expected minimum threshold :80,"
        "NCCL Test output Bw: 76.86"
    )


def test_a_wrong_value_in_any_row_means_replace() -> None:
    lines = text("p5-2node-mpirun.txt").splitlines()
    row = next(i for i, ln in enumerate(lines) if "268435456" in ln)
    lines[row] = lines[row][: lines[row].rindex("0")] + "3"  # in-place #wrong 0 -> 3
    [f] = nccl.judge(nccl.parse("\n".join(lines)), nccl.BusBandwidth(GIB, 250), 0)
    assert (f.status, f.action, f.evidence["wrong"]) == (Status.FAULT, Action.REPLACE, 3)


@pytest.mark.parametrize(
    "damaged",
    [
        text("p5-2node-mpirun.txt")[:700],  # cut in the middle of a row
        "\x00\xff garbage \n#wrong busbw\n" * 50,
        "",
    ],
)
def test_damaged_output_is_unknown_never_a_fault(damaged: str) -> None:
    [f] = nccl.judge(nccl.parse(damaged), nccl.BusBandwidth(GIB, 250), 0)
    assert f.status is Status.UNKNOWN


def test_thresholds_come_from_the_instance_type_table() -> None:
    assert nccl.threshold_for("p5.48xlarge") == nccl.BusBandwidth(GIB, 250)
    assert nccl.threshold_for("g5.xlarge") is None
    assert nccl.threshold_for(None) is None


@pytest.mark.parametrize(
    ("fixture", "rc", "reason"),
    [
        ("p5-2node-mpirun.txt", 0, "NcclTestPassed"),
        ("all_gather-out-of-bounds.txt", 1, "NcclWrongResults"),
        ("cuda-failure-mid-run.txt", 2, "NcclTestError"),
    ],
)
def test_scan_recognises_and_judges_nccl_output(
    fixture: str, rc: int, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = scan_module.main(
        [str(FIXTURES / fixture), "--instance-type", "p5.48xlarge", "--node", "n1"]
    )
    out, err = capsys.readouterr()
    assert code == rc
    assert f'"reason":"{reason}"' in out and '"node":"n1"' in out
    assert "(all_reduce_perf)" in err


def test_scan_of_a_kernel_log_is_not_taken_for_nccl_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = Path(__file__).parent / "fixtures" / "kernel" / "faults"
    first = sorted(log.glob("*.log"))[0]
    scan_module.main([str(first)])
    assert "all_reduce_perf" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fixture", "rc", "reason"),
    [
        # NCCL's NVLS (multicast) transport could not set the GPUs up: cuMulticastAddDevice's
        # "operation cannot be performed in the present state" (nccl#1788), "invalid
        # argument" (nccl#1672), "initialization error" on one worker of two (nccl#1029).
        ("nvls-present-state-nccl1788.txt", 1, "NcclCudaSetupFailure"),
        ("nvls-invalid-argument-nccl1672.txt", 1, "NcclCudaSetupFailure"),
        ("nvls-init-error-k8s-nccl1029.txt", 1, "NcclCudaSetupFailure"),
        # A CUDA failure at launch (a build without the GPU's kernels, nccl#1372): the
        # program's, not the node's.
        ("enqueue-named-symbol-nccl1372.txt", 2, "NcclTestError"),
    ],
)
def test_nccl_cuda_failures_in_setup_are_the_nodes(
    fixture: str, rc: int, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = scan_module.main([str(FIXTURES / fixture)])
    out, _ = capsys.readouterr()
    assert code == rc and f'"reason":"{reason}"' in out
    if rc == 1:
        assert '"action":"reboot"' in out


def test_a_setup_failure_the_environment_caused_is_no_node_fault() -> None:
    # nccl#1788's line with the error an idle GPU never gives: another process holds it.
    line = text("nvls-present-state-nccl1788.txt").splitlines()[0]
    busy = line.replace(
        "401 'the operation cannot be performed in the present state'",
        "46 'CUDA-capable device(s) is/are busy or unavailable'",
    )
    [f] = nccl.judge(nccl.parse(busy + "\n"), None)
    assert f.status is Status.UNKNOWN
    # Wrong results still say more than a setup failure (replace).
    table = text("all_gather-out-of-bounds.txt") + line + "\n"
    [f] = nccl.judge(nccl.parse(table), None)
    assert f.reason == "NcclWrongResults" and f.action is Action.REPLACE
