"""The tool-output parsers on damaged and hostile input: never an exception, never a fault
made of numbers a tool does not print."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checks import neuron_output as neuron
from checks.api import Action, Status
from checks.nvidia import dcgm, nccl, smi

FIXTURES = Path(__file__).parent / "fixtures"
DEEP = "[" * 100_000 + "]" * 100_000


def test_a_dcgmi_table_cut_after_a_rows_second_bar_is_unknown() -> None:
    text = (FIXTURES / "dcgm" / "r3-3.0.4-skips-truncated.txt").read_text()
    cut = text[: text.index("| Inforom") + len("| Inforom                   |")]
    assert {f.status for f in dcgm.judge(dcgm.parse(cut))} == {Status.UNKNOWN}


@pytest.mark.parametrize(
    "doc",
    [
        {"metadata": "3.3.1", "DCGM GPU Diagnostic": {"test_categories": []}},
        {"DCGM GPU Diagnostic": {"test_categories": [{"category": "x", "tests": 7}]}},
        {"DCGM GPU Diagnostic": {"test_categories": {"tests": []}}},
        {"DCGM GPU Diagnostic": {"test_categories": [{"tests": [{"results": "Pass"}]}]}},
    ],
)
def test_dcgm_json_of_the_wrong_shape_is_unknown(doc: dict) -> None:
    [f] = dcgm.judge(dcgm.parse(json.dumps(doc)))
    assert (f.status, f.reason) == (Status.UNKNOWN, "DcgmDiagError")


def test_deeply_nested_json_is_no_report() -> None:
    [f] = dcgm.judge(dcgm.parse(DEEP))
    assert f.status is Status.UNKNOWN
    assert neuron.reports('{"a": ' + DEEP + "}\n")[0] == []


def test_a_deeply_nested_journal_entry_is_no_entry() -> None:
    from checks.kernel_log.formats import journal_entry

    assert journal_entry('{"MESSAGE": ' + DEEP + "}") is None


def test_neuron_monitor_system_data_of_the_wrong_shape_is_passed_over() -> None:
    judge = neuron.ReportJudge(16, rate=float("inf"))
    assert judge.judge({"system_data": [{"neuron_hw_counters": {}}]}) == []


ROW = "  33554432  8388608  float  sum  -1  {t}  {bw}  {bw}  {w}  {t}  {bw}  {bw}  {w}\n"
HEADER = "#  size count type redop root time algbw busbw #wrong time algbw busbw #wrong\n"


@pytest.mark.parametrize(
    ("bw", "wrong"),
    [
        ("nan", "0"),
        ("inf", "0"),
        ("1e9999", "0"),
        ("-3.5", "0"),
        ("²", "0"),
        ("9" * 4301, "0"),
        ("10.5", "-5"),
        ("10.5", "²"),
        ("10.5", "9" * 4301),
        ("10.5", "nan"),
    ],
)
def test_nccl_numbers_no_run_prints_are_no_measurement(bw: str, wrong: str) -> None:
    text = HEADER + ROW.format(t="1000", bw=bw, w=wrong) + "# Avg bus bandwidth : 10\n"
    run = nccl.parse(text)
    assert run.rows == []
    [f] = nccl.judge(run, nccl.BusBandwidth(33554432, 100.0))
    assert (f.status, f.action) == (Status.UNKNOWN, Action.NONE)


def test_a_size_of_unusual_digits_is_no_row() -> None:
    text = HEADER + ROW.format(t="1000", bw="10", w="0").replace("33554432", "³" * 5)
    assert nccl.parse(text).rows == []


def test_nvidia_smi_numbers_of_unusual_digits_are_not_counted() -> None:
    q = (FIXTURES / "nvidia-smi" / "q-remapped-rows-pending.txt").read_text()
    for bad in ("²", "9" * 4301):
        text = q + f"    ECC Errors\n        Volatile\n            DRAM Uncorrectable : {bad}\n"
        assert "VolatileUncorrectableEcc" not in {f.reason for f in smi.judge_smi_q(text)}
    nvlink = "GPU 0: NVIDIA H100 (UUID: GPU-1)\n         Link 0: CRC Errors: {n}\n"
    for bad in ("²", "9" * 4301):
        [f] = smi.judge_nvlink_errors(nvlink.format(n=bad))
        assert f.status is Status.UNKNOWN


def test_neuron_tables_with_unusual_digits() -> None:
    ls = (FIXTURES / "neuron" / "neuron-ls-inf1-6xlarge-procs.txt").read_text()
    assert neuron.neuron_ls_processes(ls.replace("23518", "²²")) == [23531, 23595, 23608]
    assert neuron.parse_neuron_ls(ls.replace("| 3      |", "| " + "9" * 4301 + " |")) == [0, 1, 2]
    nccom = "size(B) count(elems) type time(us) algbw(GB/s) busbw(GB/s)\n"
    f = neuron.judge_nccom(nccom + "1 1 uint8 1.2.3 4..5 6.7.8\nAvg bus bandwidth: 1..2GB/s\n")
    assert f.status is Status.UNKNOWN
