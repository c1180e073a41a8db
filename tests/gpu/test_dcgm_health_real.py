"""DCGM health watches on a real GPU node with a running host engine (`pytest -m gpu`;
skipped where DCGM's bindings or its host engine are absent)."""

from __future__ import annotations

import pytest

from checks.api import CheckContext, Status
from checks.nvidia.dcgm_health import DcgmHealthCheck

pytestmark = pytest.mark.gpu


def test_real_host_engine_answers_and_a_healthy_node_has_no_failure() -> None:
    check = DcgmHealthCheck(CheckContext())
    if missing := check.missing():
        pytest.skip(missing[0])
    found = check.collect()
    if found[-1].reason == "DcgmUnavailable":
        pytest.skip(found[-1].message)
    assert found[-1].status is Status.OK
    assert not [f for f in found if f.status is Status.FAULT and f.action.rank > 0]
