"""The instance-type table: what a healthy node of each type has (checks/instance_types.yaml)."""

from __future__ import annotations

from checks.instance_types import _table, expected

GIB = 1 << 30


def test_allreduce_thresholds_only_where_a_figure_is_published() -> None:
    with_threshold = {name for name, e in _table().items() if e.allreduce_busbw is not None}
    assert with_threshold == {
        "p4d.24xlarge",
        "p4de.24xlarge",
        "p5.48xlarge",
        "p5e.48xlarge",
        "p5en.48xlarge",
    }
    # Each under its published figure (230.8 GB/s for 8 A100s, 313-437 for H100 at 1 GiB).
    assert expected("p4d.24xlarge").allreduce_busbw < 230.8
    assert expected("p5.48xlarge").allreduce_busbw < 313
    assert {_table()[n].allreduce_bytes for n in with_threshold} == {GIB}
    for name in ("p6-b200.48xlarge", "p6e-gb200.36xlarge", "g6e.48xlarge", "trn2.48xlarge"):
        assert expected(name).allreduce_busbw is None


def test_pcie_only_types_expect_no_nvlink_and_settings_override() -> None:
    for name in ("g5.48xlarge", "g6.12xlarge", "g6e.xlarge"):
        assert expected(name).nvlinks_per_gpu == 0
    assert expected("p6e-gb200.36xlarge").gpus == 4
    assert expected("p4d.24xlarge", {"allreduce_busbw": 100}).allreduce_busbw == 100
    assert expected("no-such.type").gpus is None
