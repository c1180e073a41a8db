"""Stand-in for DCGM's `dcgm_structs` binding module: the names and values the agent uses, as
NVIDIA's bindings define them (NVIDIA/DCGM testing/python3/dcgm_structs.py)."""

loaded_from: list = []

DCGM_OPERATION_MODE_AUTO = 1
DCGM_GROUP_DEFAULT = 0
DCGM_GROUP_DEFAULT_ENTITIES = 5
DCGM_HEALTH_WATCH_ALL = 0xFFFFFFFF
DCGM_ST_CONNECTION_NOT_VALID = -21


class DCGMError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return "Host engine connection invalid/disconnected" if self.value == -21 else "error"


def _dcgmInit(libDcgmPath=None):
    loaded_from.append(libDcgmPath)
