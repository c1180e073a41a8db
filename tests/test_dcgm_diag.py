"""dcgmi diag outputs (tests/fixtures/dcgm, verbatim) read and judged as a node would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import scan as scan_module
from checks.api import Action, Status
from checks.nvidia import dcgm

FIXTURES = Path(__file__).parent / "fixtures" / "dcgm"


def text(name: str) -> str:
    return (FIXTURES / name).read_text()


# The line dcgmi ends its table with (each fixture's first line): the quoted tables lack it.
CLOSING = text("deployment-row-remap-pending.txt").splitlines()[0] + "\n"


def verdict(doc: str, exit_code: int | None = None) -> list[tuple[Status, str, Action]]:
    return [(f.status, f.reason, f.action) for f in dcgm.judge(dcgm.parse(doc), exit_code)]


@pytest.mark.parametrize(
    ("fixture", "end", "expected"),
    [
        # GPU 0 fails GPU Memory with thermal violations (a MONITOR code): a failed test
        # with no code that says otherwise is a faulty instance...
        (
            "r2-gpu-memory-fail.txt",
            "\n" + CLOSING,
            [(Status.FAULT, "DcgmDiagFailed", Action.REPLACE)],
        ),
        # ...but where the table is cut off, a later warning's code could say otherwise.
        ("r2-gpu-memory-fail.txt", "", [(Status.UNKNOWN, "DcgmDiagCut", Action.NONE)]),
        # Pending row remaps (DCGM_FR_PENDING_ROW_REMAP, RESET): a reboot remaps them, what
        # else the cut-off rest says (a replace is no better for the node).
        (
            "deployment-row-remap-pending.txt",
            "",
            [(Status.FAULT, "DcgmDiagFailed", Action.REBOOT)],
        ),
        # sm_stress fails with error_id 50 (STRESS_LEVEL, TRIAGE, a performance category).
        ("nvvs-per-gpu.json", "", [(Status.FAULT, "DcgmDiagFailed", Action.REBOOT)]),
        # Passes until the quote ends: a cut-off run is not a passed one.
        ("r3-3.0.4-skips-truncated.txt", "", [(Status.UNKNOWN, "DcgmDiagCut", Action.NONE)]),
        ("r2-3.3.1-metadata-truncated.txt", "", [(Status.UNKNOWN, "DcgmDiagCut", Action.NONE)]),
        ("r-4.2.3-per-gpu-truncated.txt", "", [(Status.UNKNOWN, "DcgmDiagCut", Action.NONE)]),
        (
            "r2-3.3.1-metadata-truncated.txt",
            "                                           |\n" + CLOSING,
            [(Status.OK, "DcgmDiagPassed", Action.NONE)],
        ),
    ],
)
def test_verdicts(fixture: str, end: str, expected: list[tuple[Status, str, Action]]) -> None:
    assert verdict(text(fixture).rstrip("\n") + (end or "\n")) == expected


def test_text_table_details() -> None:
    run = dcgm.parse(text("r2-gpu-memory-fail.txt"))
    failed = [t for t in run.tests if t.status == "fail"]
    assert [(t.name, t.gpus) for t in failed] == [("GPU Memory", ["0"])]
    # The 45-character pieces of the wrapped warning join back into DCGM's message.
    assert (
        failed[0]
        .warnings[0]
        .message.startswith(
            "GPU 0 Thermal violations totaling 13.3 seconds started at 9.7 seconds into the test "
            "for GPU 0 Verify that the cooling"
        )
    )
    remap = dcgm.parse(text("deployment-row-remap-pending.txt")).tests[0]
    assert remap.warnings[0].message == (
        "GPU 3 has uncorrectable memory errors and row remappings are pending"
    )
    newer = dcgm.parse(text("r-4.2.3-per-gpu-truncated.txt"))
    assert newer.version == "4.2.3"
    assert sorted(t.gpus[0] for t in newer.tests if t.name == "software" and t.gpus) == [
        "0",
        "1",
        "2",
        "3",
    ]


def test_json_details() -> None:
    run = dcgm.parse(text("nvvs-per-gpu.json"))
    stress = [t for t in run.tests if t.name == "sm_stress" and t.status == "fail"]
    assert [t.gpus for t in stress] == [["0"], ["2"], ["3"]]
    assert {w.error_id for t in stress for w in t.warnings} == {50}
    [f] = dcgm.judge(run)
    assert f.evidence["gpus"] == ["0", "2", "3"] and "GPU 0" in f.message


def _json_with(status: str, error_id: int | None, message: str) -> str:
    """The fixture's document with the sm_stress results replaced: one GPU, one warning."""
    doc = json.loads(text("nvvs-per-gpu.json"))
    for cat in doc["DCGM GPU Diagnostic"]["test_categories"]:
        for t in cat["tests"]:
            if t["name"] == "sm_stress":
                warning = {"warning": message} | ({"error_id": error_id} if error_id else {})
                t["results"] = [{"gpu_ids": "0", "status": status, "warnings": [warning]}]
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("status", "error_id", "message", "expected"),
    [
        # DCGM_FR_GRAPHICS_PROCESSES: another process holds the GPU. Busy is not faulty.
        ("FAIL", 25, "NVVS has detected processes with graphics contexts open", Status.UNKNOWN),
        # DCGM_FR_MEMORY_ALLOC: the test could not get its memory: busy again.
        ("FAIL", 56, "Couldn't allocate at least 75.0% of GPU memory on GPU 0", Status.UNKNOWN),
        # DCGM_FR_ROW_REMAP_FAILURE: out of spare rows.
        (
            "FAIL",
            80,
            "GPU 0 had uncorrectable memory errors and row remapping failed.",
            Action.REPLACE,
        ),
        # The same, from the message alone (no code).
        (
            "FAIL",
            None,
            "GPU 0 had uncorrectable memory errors and row remapping failed.",
            Action.REPLACE,
        ),
        # DCGM_FR_FALLEN_OFF_BUS.
        ("FAIL", 120, "GPU 0 has fallen off the bus", Action.REPLACE),
        # A warning is an event: the node stays in.
        ("WARN", 40, "There were thermal violations totaling 2.0 seconds for GPU 0", Action.NONE),
        # Skips are not failures.
        ("SKIP", 1, "GPU 0: Unable to find hardware diagnostic, skipping this test.", Action.NONE),
    ],
)
def test_error_codes_decide_the_action(
    status: str, error_id: int | None, message: str, expected: Status | Action
) -> None:
    found = dcgm.judge(dcgm.parse(_json_with(status, error_id, message)))
    worst = next((f for f in found if f.component == "dcgm:sm_stress"), found[-1])
    if isinstance(expected, Status):
        assert worst.status is expected
    else:
        assert worst.action is expected


@pytest.mark.parametrize(
    ("output", "exit_code"),
    [
        ("Error: Unable to complete diagnostic for group 2147483647. Return: (-33) ...\n", 226),
        ("", 226),
        (text("nvvs-per-gpu.json")[:3000], 0),  # JSON cut off: nothing parses as results
        ("\x00\x7f garbage |||\n| | |\n", 0),
    ],
)
def test_a_diagnostic_that_did_not_run_is_unknown(output: str, exit_code: int) -> None:
    assert verdict(output, exit_code) == [(Status.UNKNOWN, "DcgmDiagError", Action.NONE)]


def test_every_test_skipped_is_not_a_pass() -> None:
    doc = json.loads(text("nvvs-per-gpu.json"))
    for cat in doc["DCGM GPU Diagnostic"]["test_categories"]:
        for t in cat["tests"]:
            for r in t["results"]:
                r["status"] = "SKIP"
    assert verdict(json.dumps(doc)) == [(Status.UNKNOWN, "DcgmDiagError", Action.NONE)]


def test_an_unrecognised_status_word_is_never_a_pass() -> None:
    doc = text("nvvs-per-gpu.json").replace('"status": "PASS"', '"status": "Inconclusive"', 1)
    assert (Status.UNKNOWN, "DcgmDiagError", Action.NONE) in verdict(doc)


def test_the_error_table_is_dcgms() -> None:
    codes = dcgm.table()
    assert codes.errors[85].name == "PENDING_ROW_REMAP" and codes.action(85) == "reboot"
    assert codes.errors[4] == dcgm.ErrorCode("VOLATILE_DBE_DETECTED", "ISOLATE", "HARDWARE_MEMORY")
    assert codes.action(4) == "replace"
    assert codes.action(29) == "unknown"  # persistence mode: a setting
    assert codes.action(9999) is None


@pytest.mark.parametrize(
    ("fixture", "rc", "reason"),
    [
        ("deployment-row-remap-pending.txt", 1, "DcgmDiagFailed"),
        ("r3-3.0.4-skips-truncated.txt", 2, "DcgmDiagCut"),
        ("nvvs-per-gpu.json", 1, "DcgmDiagFailed"),
    ],
)
def test_scan_recognises_and_judges_dcgm_output(
    fixture: str, rc: int, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scan_module.main([str(FIXTURES / fixture)]) == rc
    out, err = capsys.readouterr()
    assert f'"reason":"{reason}"' in out and "(dcgmi diag)" in err


def test_a_gpu_the_environment_kept_busy_is_inconclusive_never_replaced() -> None:
    # go-dcgm#52: GPU Memory fails on GPU 0 with "Error using CUDA API cuCtxCreate ...
    # 'CUDA-capable device(s) is/are busy or unavailable'", the Diagnostic test with "API call
    # cuMemGetInfo failed: 'context is destroyed'", and the quote ends under Targeted Stress.
    found = dcgm.judge(dcgm.parse(text("r2-cuda-busy-go-dcgm52-cut.txt")))
    assert {f.status for f in found} == {Status.UNKNOWN}
    by_test = {f.component: f.reason for f in found}
    assert by_test["dcgm:gpu_memory"] == by_test["dcgm:diagnostic"] == "DcgmDiagInconclusive"
    # Closed after the Hardware tests, it says the same: a busy GPU, not a faulty one.
    closed = text("r2-cuda-busy-go-dcgm52-cut.txt").split("+-----  Stress")[0] + CLOSING
    assert {f.status for f in dcgm.judge(dcgm.parse(closed))} == {Status.UNKNOWN}


@pytest.mark.parametrize(
    ("error_id", "warning", "action"),
    [
        # A hardware code, but the text says the environment failed the test: inconclusive.
        (
            50,
            "GPU 0 API call cudaEventCreate failed for GPU0: 'CUDA-capable device(s) "
            "is/are busy or unavailable' Check DCGM and system logs for errors.",
            "unknown",
        ),
        (
            None,
            "Error using CUDA API cuInit: CUDA driver version is insufficient for CUDA "
            "runtime version",
            "unknown",
        ),
        (None, "Error calling NVML API nvmlInit: Insufficient Permissions", "unknown"),
        # CUDA_API (51) is MONITOR: for a failed test it still says the software failed it.
        (51, "Error using CUDA API cudaMalloc", "unknown"),
        # A CUDA error that is the hardware's stays one (cudaErrorECCUncorrectable).
        (
            None,
            "API call cudaMemcpy failed for GPU 0: 'uncorrectable ECC error encountered'",
            "replace",
        ),
    ],
)
def test_environment_failures_by_their_words(
    error_id: int | None, warning: str, action: str
) -> None:
    assert dcgm.table().test_action(dcgm.DiagWarning(warning, error_id)) == action


def _capped_dcgm4() -> str:
    """DCGM 4's diagnostic test fragment (issue #215) in a document of nvvs-per-gpu.json's
    shape."""
    fragment = text("4.x-diagnostic-info-capped-fragment.txt").rstrip().removesuffix(",")
    cats = [{"category": "Hardware", "tests": [json.loads(fragment)]}]
    return json.dumps({"DCGM GPU Diagnostic": {"test_categories": cats}})


def test_performance_figures_are_each_figure_s_worst_gpu() -> None:
    """PCIe bandwidth (the lowest GPU) and latency (the highest) from DCGM 3.x's per-GPU info;
    DCGM 4's Diagnostic gigaflops where its capped info still carries them."""
    assert dcgm.figures(dcgm.parse(text("nvvs-per-gpu.json"))) == {
        "dcgm_pcie_d2h_gb_s": 13.07,
        "dcgm_pcie_h2d_gb_s": 12.13,
        "dcgm_pcie_bidir_gb_s": 22.41,
        "dcgm_pcie_d2h_usec": 4.386,
        "dcgm_pcie_h2d_usec": 4.2,
        "dcgm_pcie_bidir_usec": 7.482,
    }
    assert dcgm.figures(dcgm.parse(_capped_dcgm4())) == {"dcgm_diagnostic_gflops": 859.08}


def test_a_gpu_whose_test_did_not_pass_gives_no_figure() -> None:
    doc = json.loads(text("nvvs-per-gpu.json"))
    for cat in doc["DCGM GPU Diagnostic"]["test_categories"]:
        for t in cat["tests"]:
            for r in t["results"]:
                if t["name"] == "pcie" and r["gpu_ids"] == "0":
                    r["status"] = "FAIL"
    found = dcgm.figures(dcgm.parse(json.dumps(doc)))
    assert found["dcgm_pcie_d2h_usec"] == 3.269  # GPU 0's 4.386 is not a measurement to keep
