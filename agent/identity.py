"""Who this node is: from the settings first, then the EC2 instance metadata service (IMDSv2).

IMDS is asked only when `imds` is `on`, or `auto` and the host's DMI data says EC2, so the agent
sends nothing to 169.254.169.254 off AWS. Every failure there is silent: identity stays partial.
Not botocore's IMDS fetchers: their public API gives only credentials and a region cut from the
zone's name (wrong in Local Zones), they fall back to IMDSv1, and botocore costs ~16 MiB to load.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import Settings

_DMI_FILES = ("sys/devices/virtual/dmi/id/sys_vendor", "sys/devices/virtual/dmi/id/board_asset_tag")
_IMDS_FIELDS = {
    "instance_id": "meta-data/instance-id",
    "instance_type": "meta-data/instance-type",
    "region": "meta-data/placement/region",
}


@dataclass(frozen=True, slots=True)
class Identity:
    node_name: str
    instance_id: str | None = None
    instance_type: str | None = None
    region: str | None = None
    cluster_name: str | None = None
    cluster_id: str | None = None
    node_group: str | None = None


def resolve(settings: Settings) -> Identity:
    """Blocking (IMDS is a network call): run it in a thread from async code."""
    given = {f.name: getattr(settings, f.name) for f in fields(Identity)}
    ident = Identity(**given | {"node_name": settings.node_name or socket.gethostname()})
    missing = [f for f in _IMDS_FIELDS if getattr(ident, f) is None]
    if not missing or not _imds_wanted(settings):
        return ident
    found = query_imds(
        settings.imds_endpoint, [_IMDS_FIELDS[f] for f in missing], settings.imds_timeout
    )
    return replace(ident, **{f: found[p] for f in missing if (p := _IMDS_FIELDS[f]) in found})


def _imds_wanted(settings: Settings) -> bool:
    if settings.imds != "auto":
        return settings.imds == "on"
    return any(_reads_amazon(settings.host_root / name) for name in _DMI_FILES)


def _reads_amazon(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace").strip().lower()
    except OSError:
        return False
    return text.startswith("amazon") or text.startswith("i-")


def query_imds(endpoint: str, paths: list[str], timeout: float) -> dict[str, str]:
    """IMDSv2: a session token by PUT, then one GET per path. Returns what it could get."""
    import urllib.error
    import urllib.request

    base = endpoint.rstrip("/") + "/latest/"
    try:
        token_req = urllib.request.Request(
            base + "api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        with urllib.request.urlopen(token_req, timeout=timeout) as resp:
            token = resp.read().decode()
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    found: dict[str, str] = {}
    for path in paths:
        req = urllib.request.Request(base + path, headers={"X-aws-ec2-metadata-token": token})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                found[path] = resp.read().decode().strip()
        except (OSError, urllib.error.URLError, ValueError):
            continue
    return found
