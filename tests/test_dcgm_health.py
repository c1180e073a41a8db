"""DCGM health watches through DCGM's Python bindings (a stand-in for them on the bindings
path, tests/fakes/dcgm): each incident judged by DCGM's grade and error code, incidents that
went away cleared, a host engine that is down or comes back, and the daemon acting on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from checks.api import Action, CheckContext, Status
from checks.nvidia.dcgm_health import DcgmHealthCheck, DcgmHealthOptions
from tests.conftest import REPO, spooled, wait_for
from tests.test_daemon import node_state, start, stop

FAKES = str(REPO / "tests" / "fakes" / "dcgm")
GPU, MEMORY, PCIE, THERMAL, NVLINK = 1, 0x10, 0x1, 0x80, 0x2
WARN, FAIL = 10, 20
# Messages as DCGM words them (dcgmlib/dcgm_errors.h, DCGM_FR_*_MSG); the thermal one as a
# user quoted it from a node (NVIDIA/DCGM#270).
DBE = [GPU, 3, MEMORY, FAIL, 4, "Detected 2 volatile double-bit ECC error(s) in GPU 3."]
THERMAL_WARN = [
    GPU,
    2,
    THERMAL,
    WARN,
    10,
    "Detected clocks event due to thermal violation in GPU 2. Verify that the cooling on this "
    "machine is functional, including external, thermal material interface, fans, and any other "
    "components.",
]


@pytest.fixture
def dcgm(tmp_path, monkeypatch):
    """Write what the host engine answers; the bindings are unloaded again afterwards."""
    state = tmp_path / "dcgm.json"
    monkeypatch.setenv("FAKE_DCGM", str(state))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield lambda **answer: state.write_text(json.dumps(answer))
    for name in ("pydcgm", "dcgm_structs"):
        sys.modules.pop(name, None)


def check(tmp_path: Path, bindings: str = FAKES) -> DcgmHealthCheck:
    opts = DcgmHealthOptions(address="10.0.0.5:5555", bindings=[bindings])
    return DcgmHealthCheck(CheckContext(host_root=tmp_path / "host"), opts)


def test_no_bindings_means_skipped_with_the_reason(tmp_path, dcgm):
    (tmp_path / "empty").mkdir()
    c = check(tmp_path, str(tmp_path / "empty"))
    assert c.missing() == [
        f"DCGM Python bindings not found ({tmp_path / 'empty'}, "
        f"{tmp_path / 'host' / str(tmp_path / 'empty').lstrip('/')})"
    ]


def test_bindings_and_libdcgm_under_the_host_root_are_used(tmp_path, dcgm):
    host = tmp_path / "host"
    inside = host / "usr/share/dcgm/bindings"
    inside.parent.mkdir(parents=True)
    inside.symlink_to(FAKES)
    libs = host / "usr/lib64"
    libs.mkdir(parents=True)
    (libs / "libdcgm.so.4").write_bytes(b"")
    c = DcgmHealthCheck(
        CheckContext(host_root=host), DcgmHealthOptions(bindings=["/usr/share/dcgm/bindings"])
    )
    assert c.missing() == []
    dcgm(incidents=[])
    c.collect()
    import dcgm_structs

    assert dcgm_structs.loaded_from == [str(libs)]


def test_healthy_node_watches_everything_and_reports_no_incident(tmp_path, dcgm):
    dcgm(incidents=[])
    import_calls = check(tmp_path).collect()
    import pydcgm

    assert pydcgm.CALLS[-3:] == [
        "connect 10.0.0.5:5555 mode=1",
        "group node-health-agent type=5",
        "watch 0xffffffff",
    ]
    [summary] = import_calls
    assert (summary.component, summary.status, summary.message) == (
        "node",
        Status.OK,
        "DCGM health watches: 0 incidents",
    )


@pytest.mark.parametrize(
    ("incident", "status", "action", "reason"),
    [
        (DBE, Status.FAULT, Action.REPLACE, "DcgmVolatileDbeDetected"),
        (
            [GPU, 0, MEMORY, FAIL, 6, "A pending retired page has been detected in GPU 0."],
            Status.FAULT,
            Action.REBOOT,
            "DcgmPendingPageRetirements",
        ),
        (
            [
                GPU,
                1,
                MEMORY,
                FAIL,
                80,
                "GPU 1 had uncorrectable memory errors and row remapping failed.",
            ],
            Status.FAULT,
            Action.REPLACE,
            "DcgmRowRemapFailure",
        ),
        (
            [GPU, 5, NVLINK, FAIL, 14, "GPU 5's NvLink link 3 is currently down"],
            Status.FAULT,
            Action.REBOOT,  # DCGM files it TRIAGE: a reset may bring the link back
            "DcgmNvlinkDown",
        ),
        # DCGM's grade decides first: a warning never takes a node out.
        (THERMAL_WARN, Status.FAULT, Action.NONE, "DcgmHealthWarning"),
        (
            [GPU, 4, PCIE, WARN, 3, "Detected more than 8 PCIe replays per minute for GPU 4 : 13"],
            Status.FAULT,
            Action.NONE,
            "DcgmHealthWarning",
        ),
        # A code DCGM itself files as busy or a setting: not the hardware's fault.
        (
            [GPU, 0, MEMORY, FAIL, 25, "processes with graphics contexts"],
            Status.UNKNOWN,
            Action.NONE,
            "DcgmHealthInconclusive",
        ),
        # A failure whose code this DCGM is newer than: DCGM still failed it.
        (
            [GPU, 0, 0x20, FAIL, 9999, "a new failure"],
            Status.FAULT,
            Action.REBOOT,
            "DcgmHealthFailure",
        ),
    ],
)
def test_each_incident_is_judged_by_grade_and_code(
    tmp_path, dcgm, incident, status, action, reason
):
    dcgm(incidents=[incident])
    found = check(tmp_path).collect()
    f = found[0]
    assert (f.status, f.action, f.reason) == (status, action, reason)
    assert f.condition == "DcgmHealth"
    assert incident[-1] in f.message
    assert f.evidence["dcgm_error"] == incident[4]
    assert found[-1].status is Status.OK and found[-1].component == "node"


def test_component_names_entity_and_subsystem_and_warning_severity(tmp_path, dcgm):
    dcgm(incidents=[DBE, THERMAL_WARN])
    dbe, thermal, _ = check(tmp_path).collect()
    assert dbe.component == "gpu:3:memory"
    assert "GPU 3 Memory" in dbe.message
    assert (thermal.component, thermal.severity) == ("gpu:2:thermal", "warn")


def test_an_incident_that_went_away_is_cleared(tmp_path, dcgm):
    c = check(tmp_path)
    dcgm(incidents=[DBE, THERMAL_WARN])
    c.collect()
    dcgm(incidents=[DBE])
    found = c.collect()
    cleared = [f for f in found if f.status is Status.OK and f.component != "node"]
    assert [(f.component, f.reason) for f in cleared] == [("gpu:2:thermal", "DcgmHealthy")]
    assert found[0].component == "gpu:3:memory" and found[0].status is Status.FAULT


def test_host_engine_down_is_unknown_and_a_restarted_one_is_reconnected(tmp_path, dcgm):
    import_check = check(tmp_path)
    dcgm(incidents=[])
    import_check.collect()
    dcgm(down=True)
    [f] = import_check.collect()
    assert (f.status, f.reason) == (Status.UNKNOWN, "DcgmUnavailable")
    assert "10.0.0.5:5555" in f.message and "connection invalid" in f.message
    dcgm(incidents=[DBE])
    assert import_check.collect()[0].action is Action.REPLACE
    import pydcgm

    assert sum(c.startswith("connect") for c in pydcgm.CALLS) >= 2


def test_daemon_takes_out_a_node_dcgm_fails(cli_env, tmp_path, dcgm):
    (tmp_path / "dcgm.json").write_text(json.dumps({"incidents": [DBE]}))
    cfg = tmp_path / "dcgm.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n  fixed: {enabled: false}\n"
        f"  dcgm_health:\n    bindings: [{FAKES}]\n"
    )
    env = cli_env | {"FAKE_DCGM": str(tmp_path / "dcgm.json")}
    state = tmp_path / "state"
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: any("verdict" in e for e in spooled(state)))
    finally:
        stop(proc)
    node = node_state(state)
    assert node["labels"]["sagemaker.amazonaws.com/node-health-status"] == (
        "UnschedulablePendingReplacement"
    )
    [event] = [e for e in spooled(state) if e.get("reason") == "DcgmVolatileDbeDetected"]
    assert "Detected 2 volatile double-bit ECC error(s) in GPU 3." in event["msg"]
