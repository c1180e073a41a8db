"""Stand-in for DCGM's `pydcgm` binding module (NVIDIA/DCGM testing/python3/DcgmHandle.py and
DcgmGroup.py): a handle, a group, and the group's health watches.

What the host engine sees comes from the JSON file named by FAKE_DCGM, read at every call:
{"down": true} for a host engine that does not answer, {"incidents": [[entity group, entity id,
system, health, code, message], ...]} for what the watches found."""

import json
import os
from types import SimpleNamespace

import dcgm_structs

CALLS: list[str] = []


def _state() -> dict:
    path = os.environ.get("FAKE_DCGM")
    return json.loads(open(path).read()) if path and os.path.exists(path) else {}


def _answer() -> dict:
    state = _state()
    if state.get("down"):
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)
    return state


class DcgmHandle:
    def __init__(self, ipAddress=None, opMode=None):
        _answer()
        CALLS.append(f"connect {ipAddress} mode={opMode}")


class _Health:
    def Set(self, systems):
        CALLS.append(f"watch 0x{systems:x}")

    def Check(self):
        incidents = [
            SimpleNamespace(
                system=system,
                health=health,
                error=SimpleNamespace(code=code, msg=message.encode()),
                entityInfo=SimpleNamespace(entityGroupId=group, entityId=entity),
            )
            for group, entity, system, health, code, message in _answer().get("incidents", [])
        ]
        worst = max((i.health for i in incidents), default=0)
        return SimpleNamespace(
            overallHealth=worst, incidentCount=len(incidents), incidents=incidents
        )


class DcgmGroup:
    def __init__(self, dcgmHandle, groupName=None, groupType=None):
        CALLS.append(f"group {groupName} type={groupType}")
        self.health = _Health()
