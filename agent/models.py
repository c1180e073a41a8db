"""The plain settings models the decision needs, kept apart from pydantic-settings.

`agent.policy` and `node-health scan` need these without the cost of loading the whole
settings machinery; `agent.config` builds the full `Settings` on top of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, Duration


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class CheckSettings(BaseModel):
    """Per-check settings. Keys other than these three are the check's own options."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    enabled: bool | None = None
    interval: Duration | None = None
    timeout: Duration | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RuleMatch(Strict):
    """Shell-style patterns (fnmatch) on a finding's fields; all given must match."""

    check: str | None = None
    condition: str | None = None
    reason: str | None = None
    component: str | None = None
    action: Action | None = None


class PolicyRule(Strict):
    """One line of the policy table: which findings, and what they mean for the node."""

    name: str
    match: RuleMatch = RuleMatch()
    action: Action | None = Field(None, description="replaces the finding's recommended action")
    count: int = Field(1, ge=1, description="occurrences needed before the action applies")
    window: Duration | None = Field(None, description="the occurrences must fall within this")
    latch: bool | None = Field(
        None, description="hold the verdict until a reboot (default: for reboot and replace)"
    )
    clean_polls: int = Field(3, ge=1, description="consecutive clean polls that clear it")
    ttl: Duration | None = Field(None, description="cleared this long after the last fault")
    escalate: bool = Field(True, description="back after the reboot it asked for: replace")


class PolicySettings(Strict):
    rules: list[PolicyRule] = Field(
        default_factory=list, description="tried before the packaged table, first match wins"
    )
    replace_builtin: bool = Field(False, description="use only `rules`, not the packaged table")
    temporary_ttl: Duration = Field(3600.0, description="how long an event-only fault counts")
    escalation_window: Duration = Field(7 * 86400.0, description="how long a reboot is remembered")


class NodeKeys(Strict):
    """Label, taint and annotation names the agent writes (HyperPod's by default)."""

    health_status_label: str = "sagemaker.amazonaws.com/node-health-status"
    deep_health_check_label: str = "sagemaker.amazonaws.com/deep-health-check-status"
    taint_key: str = "sagemaker.amazonaws.com/node-health-status"
    fault_details_annotation: str = "sagemaker.amazonaws.com/fault-details"


class SpoolSettings(Strict):
    max_segment_bytes: int = Field(8 * 1024 * 1024, ge=4096)
    max_segments: int = Field(8, ge=2)
