"""Random and damaged input into every parser and into `scan`: never an exception, never a
fault out of garbage, and a cut-off output judged no worse than the whole of it.

Hypothesis runs derandomized (the same examples every run) and small, to keep CI in seconds;
the prefixes are taken deterministically: every line boundary of every fixture, both ends of
each newline, and random byte cuts.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import scan as scan_module
from agent import tool_outputs
from agent.identity import Identity
from agent.policy import PolicySettings, Verdict
from checks import efa_output, neuron_output
from checks.kernel_log import rules
from checks.nvidia import dcgm, nccl, smi

FIXTURES = Path(__file__).parent / "fixtures"
SAVED = sorted(
    p
    for kind in ("dcgm", "nccl", "neuron", "efa", "nvidia-smi", "kernel/faults", "kernel/benign")
    for p in (FIXTURES / kind).iterdir()
    if p.suffix in (".txt", ".json", ".log")
)
# Instance types whose counts and thresholds the fixtures are judged against: none, and, for
# the outputs with a count or a threshold, the types they come from (a count judged from a cut
# list is where cuts did harm).
TYPES = [None, "p4de.24xlarge", "p5.48xlarge", "trn2n.48xlarge", "inf1.6xlarge"]
TYPES_OF = {
    "nccl": [None, "p4de.24xlarge", "p5.48xlarge"],
    "efa": [None, "p4de.24xlarge", "p5.48xlarge"],
    "neuron": [None, "trn2n.48xlarge", "inf1.6xlarge"],
}
CI = settings(
    derandomize=True,
    database=None,  # nothing kept between runs: the examples are the same every time
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def ruleset() -> rules.RuleSet:
    return rules.build()


def scan(data: bytes, itype: str | None = None) -> scan_module.ScanResult:
    return scan_module.scan(
        io.BytesIO(data),
        ruleset(),
        PolicySettings(),
        Identity("fuzz"),
        io.StringIO(),
        engine="re",  # the same rules; hyperscan's compile per scan would dominate the suite
        instance_type=itype,
    )


PARSERS = [
    lambda t: dcgm.judge(dcgm.parse(t)),
    lambda t: nccl.judge(nccl.parse(t), nccl.BusBandwidth(1 << 30, 80.0)),
    lambda t: nccl.judge(nccl.parse(t), None, 0),
    smi.judge_smi_q,
    smi.judge_nvlink_errors,
    lambda t: neuron_output.reports(t),
    lambda t: neuron_output.neuron_ls_processes(t),
    lambda t: neuron_output.count_finding(len(neuron_output.parse_neuron_ls(t) or []), 16),
    lambda t: neuron_output.judge_nccom(t, 0),
    lambda t: efa_output.judge_fi_info(t, 4),
    lambda t: efa_output.judge_loopback("efa0", t, 1, False),
    *(lambda t, k=k: k.judge(t, "p5.48xlarge") for k in tool_outputs.KINDS),
]


@CI
@given(st.binary(max_size=4096))
def test_random_bytes_are_never_a_fault(data: bytes) -> None:
    result = scan(data)
    assert result.verdict is Verdict.SCHEDULABLE
    assert scan_module.exit_status(result) in (0, 2)


@CI
@given(st.text(max_size=2000))
def test_random_text_into_every_parser(text: str) -> None:
    for parse in PARSERS:
        parse(text)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "DCGM GPU Diagnostic",
                    "test_categories",
                    "tests",
                    "results",
                    "status",
                    "warnings",
                    "error_id",
                    "metadata",
                    "version",
                    "system_data",
                    "neuron_hw_counters",
                    "neuron_devices",
                    "neuron_device_index",
                    "mem_ecc_uncorrected",
                    "neuron_hardware_info",
                    "neuron_device_count",
                    "error",
                    "MESSAGE",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@CI
@given(JSON)
def test_random_json_into_every_json_reader(doc: object) -> None:
    text = json.dumps(doc)
    dcgm.judge(dcgm.parse(text))
    neuron_output.reports(text + "\n")
    if isinstance(doc, dict):
        neuron_output.ReportJudge(16, rate=1.0).judge(doc)
    result = scan(text.encode() + b"\n", "trn2n.48xlarge")
    assert scan_module.exit_status(result) in (0, 1, 2)


@CI
@given(
    st.sampled_from(SAVED),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 8), st.binary(max_size=8))),
)
def test_mutated_fixtures_are_no_crash(path: Path, edits: list) -> None:
    data = bytearray(path.read_bytes())
    for at, cut, insert in edits:
        at %= len(data) + 1
        data[at : at + cut] = insert
    for parse in PARSERS:
        parse(data.decode("utf-8", "replace"))
    scan(bytes(data), "p5.48xlarge")


def _no_worse(prefix: scan_module.ScanResult, whole: scan_module.ScanResult) -> bool:
    return prefix.verdict.rank <= whole.verdict.rank


@pytest.mark.parametrize("path", SAVED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_line_prefix_is_judged_no_worse_than_the_whole(path: Path) -> None:
    data = path.read_bytes()
    cuts = {i for i, b in enumerate(data) if b == 0x0A} | {
        i + 1 for i, b in enumerate(data) if b == 0x0A
    }
    for itype in TYPES_OF.get(path.parent.name, [None]):
        whole = scan(data, itype)
        for cut in sorted(cuts):
            prefix = scan(data[:cut], itype)
            assert _no_worse(prefix, whole), (itype, cut, data[:cut][-120:], prefix.findings)


@settings(derandomize=True, database=None, max_examples=40, deadline=None)
@given(st.sampled_from(SAVED), st.integers(0, 1 << 20), st.sampled_from(TYPES))
def test_every_byte_prefix_is_judged_no_worse_than_the_whole(
    path: Path, cut: int, itype: str | None
) -> None:
    data = path.read_bytes()
    cut %= len(data) + 1
    prefix, whole = scan(data[:cut], itype), scan(data, itype)
    assert _no_worse(prefix, whole), (cut, data[:cut][-120:], prefix.findings)
