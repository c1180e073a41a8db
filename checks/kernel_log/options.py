"""The kernel-log check's options and the rule set they make.

Apart from the check so that `node-health scan` gets the daemon's very rules without loading
what following a live log takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from checks.kernel_log import rules
from checks.units import Duration


class KernelLogOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    source: Literal["auto", "kmsg", "journal", "file"] = "auto"
    kmsg_path: str = "/dev/kmsg"
    journalctl: str = "journalctl"
    files: list[str] = Field(default_factory=lambda: ["/var/log/kern.log", "/var/log/messages"])
    rules_files: list[Path] = Field(default_factory=list, description="tried before the packaged")
    rules: list[dict[str, Any]] = Field(default_factory=list, description="inline, tried first")
    disable_rules: list[str] = Field(default_factory=list)
    engine: Literal["auto", "hyperscan", "re"] = "auto"
    dedup: Duration | None = None


def ruleset(opts: KernelLogOptions) -> rules.RuleSet:
    """The packaged rules with the settings' files and inline rules before them."""
    extra = [rules.validate({"rules": opts.rules}, "checks.kernel_log.rules")] if opts.rules else []
    extra += [rules.load_file(p) for p in opts.rules_files]
    return rules.build(extra, set(opts.disable_rules), opts.dedup)
