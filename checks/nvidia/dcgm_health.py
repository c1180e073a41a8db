"""DCGM's background health watches, where a DCGM host engine runs (what `dcgmi health -c`
shows), through DCGM's own Python bindings.

The API rather than `dcgmi`: each incident carries its DCGM error code (DCGM_FR_*), which
`checks/nvidia/dcgm_errors.yaml` turns into an action; `dcgmi health -c` prints only the
message. DCGM grades each incident itself: a warning is reported and leaves the node alone, a
failure takes its code's action (a busy GPU or a setting: unknown, never a fault). When an
incident is gone from DCGM's answer, its finding is cleared.

The bindings ship with DCGM (`datacenter-gpu-manager-4`), not on PyPI: they are looked up in
DCGM's install directories, as they are or under the host root. No bindings: the check says so
once and is skipped. No host engine answering: unknown, never a fault.
"""

from __future__ import annotations

import importlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, CheckContext, Finding, PollingCheck, Status
from checks.nvidia.dcgm import table

CHECK = "dcgm_health"
CONDITION = "DcgmHealth"
BINDINGS = (
    "/usr/share/datacenter-gpu-manager-4/bindings/python3",  # DCGM 4
    "/usr/local/dcgm/bindings/python3",  # DCGM 3
)
# Where the bindings look for libdcgm themselves; under a host root they must be told.
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64")
LIBRARY = "libdcgm.so.4"
# dcgm_structs.DCGM_HEALTH_WATCH_*: the subsystem an incident is about.
SYSTEMS = {
    0x1: "PCIe",
    0x2: "NVLink",
    0x4: "PMU",
    0x8: "MCU",
    0x10: "Memory",
    0x20: "SM",
    0x40: "InfoROM",
    0x80: "Thermal",
    0x100: "Power",
    0x200: "Driver",
    0x400: "NVSwitch non-fatal",
    0x800: "NVSwitch fatal",
    0x1000: "ConnectX",
}
# dcgm_fields.DCGM_FE_*: the kind of entity an incident is on.
ENTITIES = {1: "gpu", 2: "vgpu", 3: "nvswitch", 4: "gpu-instance", 6: "nvlink", 9: "connectx"}
WARN, FAIL = 10, 20  # dcgm_structs.DCGM_HEALTH_RESULT_WARN, _FAIL


class DcgmUnavailableError(Exception):
    """No bindings, no libdcgm, or no host engine answering: DCGM cannot be asked here."""


@dataclass(frozen=True)
class Incident:
    entity: str  # gpu, nvswitch, connectx ...
    entity_id: int
    system: str
    health: int  # WARN or FAIL
    code: int  # DCGM_FR_*
    message: str


class DcgmHealth(Protocol):
    def check(self) -> list[Incident]:
        """Every incident DCGM's watches see now. Raises DcgmUnavailableError."""
        ...


class PydcgmBackend:
    """DCGM's bindings: one connection, one group of every entity with every watch, kept
    between polls and made again after the host engine went away."""

    def __init__(self, address: str, bindings: list[str], library_dir: str | None = None) -> None:
        self.address = address
        self.bindings = bindings
        self.library_dir = library_dir  # the host's libdcgm, when it is not where we run
        self._group: Any = None
        self._handle: Any = None
        self._lock = threading.Lock()

    def load(self) -> tuple[Any, Any]:
        """(pydcgm, dcgm_structs), from the first install directory that has them."""
        for path in self.bindings:
            if path not in sys.path:
                sys.path.append(path)
        try:
            return importlib.import_module("pydcgm"), importlib.import_module("dcgm_structs")
        except ImportError as exc:
            where = ", ".join(self.bindings)
            raise DcgmUnavailableError(f"DCGM Python bindings not found ({where})") from exc

    def check(self) -> list[Incident]:
        with self._lock:
            pydcgm, structs = self.load()
            try:
                if self._group is None:
                    self._connect(pydcgm, structs)
                response = self._group.health.Check()
            except structs.DCGMError as exc:
                self._group = self._handle = None  # a host engine that restarted: connect anew
                raise DcgmUnavailableError(f"DCGM at {self.address}: {exc}") from exc
            return [_incident(response.incidents[i]) for i in range(response.incidentCount)]

    def _connect(self, pydcgm: Any, structs: Any) -> None:
        if self.library_dir is not None:
            structs._dcgmInit(self.library_dir)  # loads libdcgm from there, once
        self._handle = pydcgm.DcgmHandle(
            ipAddress=self.address, opMode=structs.DCGM_OPERATION_MODE_AUTO
        )
        kind = getattr(structs, "DCGM_GROUP_DEFAULT_ENTITIES", structs.DCGM_GROUP_DEFAULT)
        group = pydcgm.DcgmGroup(self._handle, groupName="node-health-agent", groupType=kind)
        group.health.Set(structs.DCGM_HEALTH_WATCH_ALL)
        self._group = group


def _incident(raw: Any) -> Incident:
    msg = raw.error.msg
    return Incident(
        entity=ENTITIES.get(raw.entityInfo.entityGroupId, f"entity{raw.entityInfo.entityGroupId}"),
        entity_id=int(raw.entityInfo.entityId),
        system=SYSTEMS.get(raw.system, f"system 0x{raw.system:x}"),
        health=int(raw.health),
        code=int(raw.error.code),
        message=(msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)).strip(),
    )


def judge(incident: Incident) -> Finding:
    """What one incident means: DCGM's grade first, then the code's action for a failure."""
    codes = table()
    code = codes.errors.get(incident.code)
    name = code.name if code else f"code {incident.code}"
    component = f"{incident.entity}:{incident.entity_id}:{incident.system.lower()}"
    evidence = {
        "entity": incident.entity,
        "entity_id": incident.entity_id,
        "system": incident.system,
        "dcgm_error": incident.code,
        "dcgm_error_name": name,
        "health": "fail" if incident.health >= FAIL else "warn",
    }
    where = f"{incident.entity.upper()} {incident.entity_id} {incident.system}"
    if incident.health < FAIL:
        return Finding(
            component,
            CONDITION,
            Status.FAULT,
            "DcgmHealthWarning",
            f"DCGM health warning on {where}: {incident.message}",
            Action.NONE,
            evidence,
            check=CHECK,
            severity="warn",
        )
    # A failure with a code this table does not know: DCGM still judged it a failure, and a
    # reboot is the least a failed subsystem needs.
    action = codes.action(incident.code) or "reboot"
    if action == "unknown":
        return Finding(
            component,
            CONDITION,
            Status.UNKNOWN,
            "DcgmHealthInconclusive",
            f"DCGM health could not judge {where}: {incident.message}",
            evidence=evidence,
            check=CHECK,
        )
    return Finding(
        component,
        CONDITION,
        Status.FAULT,
        f"Dcgm{''.join(w.title() for w in name.split('_'))}" if code else "DcgmHealthFailure",
        f"DCGM health failure on {where}: {incident.message}",
        Action(action),
        evidence,
        check=CHECK,
    )


class DcgmHealthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    address: str = Field("127.0.0.1:5555", description="the DCGM host engine, host:port")
    bindings: list[str] = Field(
        default_factory=lambda: list(BINDINGS),
        description="where DCGM's Python bindings are; each is also tried under the host root",
    )


class DcgmHealthCheck(PollingCheck):
    name = "dcgm_health"
    description = "DCGM health watches of a running host engine (what dcgmi health -c shows)"
    interval = 30.0
    timeout = 20.0
    Options: ClassVar[type[BaseModel]] = DcgmHealthOptions

    def __init__(
        self,
        ctx: CheckContext,
        options: BaseModel | None = None,
        backend: DcgmHealth | None = None,
    ) -> None:
        super().__init__(ctx, options)
        opts: DcgmHealthOptions = self.options  # type: ignore[assignment]
        paths = [p for b in opts.bindings for p in (b, str(ctx.path(b)))]
        self._bindings = list(dict.fromkeys(paths))
        libs = [ctx.path(d) for d in LIBRARY_DIRS] if ctx.host_root != Path("/") else []
        lib = next((str(d) for d in libs if (d / LIBRARY).exists()), None)
        self.backend = backend or PydcgmBackend(opts.address, self._bindings, lib)
        self._faulted: set[str] = set()

    def missing(self) -> list[str]:
        if not isinstance(self.backend, PydcgmBackend):
            return []
        try:
            self.backend.load()
        except DcgmUnavailableError as exc:
            return [str(exc)]
        return []

    def collect(self) -> list[Finding]:
        try:
            incidents = self.backend.check()
        except DcgmUnavailableError as exc:
            return [
                Finding(
                    "node",
                    CONDITION,
                    Status.UNKNOWN,
                    "DcgmUnavailable",
                    f"DCGM health watches could not be read: {exc}",
                    check=CHECK,
                )
            ]
        found = [judge(i) for i in incidents]
        now = {f.component for f in found}
        cleared = [
            Finding(
                c,
                CONDITION,
                Status.OK,
                "DcgmHealthy",
                f"DCGM health: {c} has no incident any more",
                check=CHECK,
            )
            for c in sorted(self._faulted - now)
        ]
        self._faulted = now
        summary = Finding(
            "node",
            CONDITION,
            Status.OK,
            "DcgmHealthRead",
            f"DCGM health watches: {len(incidents)} incidents",
            evidence={"incidents": len(incidents)},
            check=CHECK,
        )
        return [*found, *cleared, summary]
