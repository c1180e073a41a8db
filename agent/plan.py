"""Which checks run: the registry, filtered and configured by the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import ConfigError, Settings, check_options
from checks import registry
from checks.api import Check, CheckContext, PollingCheck


@dataclass
class PlannedCheck:
    name: str
    enabled: bool
    check: Check | None = None  # None when it could not be loaded
    interval: float | None = None  # None: a streaming check
    timeout: float = 30.0
    missing: list[str] = field(default_factory=list)
    error: str | None = None
    description: str = ""

    @property
    def runnable(self) -> bool:
        return self.enabled and self.check is not None and not self.missing


def plan(settings: Settings, ctx: CheckContext) -> list[PlannedCheck]:
    """Every known check with its settings applied. Raises ConfigError for bad check settings."""
    known = registry.available()
    unknown = sorted(set(settings.checks) - set(known))
    if unknown:
        raise ConfigError(f"checks.{unknown[0]}: no such check (known: {', '.join(sorted(known))})")
    planned = []
    for name, ref in sorted(known.items()):
        cfg = settings.checks.get(name)
        try:
            cls = registry.load(name, ref)
        except registry.PluginError as exc:
            # Installed but broken: on unless the settings turn it off, so the error is seen.
            enabled = cfg.enabled if cfg and cfg.enabled is not None else True
            planned.append(PlannedCheck(name, enabled=enabled, error=str(exc)))
            continue
        enabled = cfg.enabled if cfg and cfg.enabled is not None else cls.enabled_by_default
        options = check_options(name, cls, cfg)
        try:
            check = cls(ctx, options)
        except ValueError as exc:  # e.g. a rules file the check cannot use
            raise ConfigError(f"checks.{name}: {exc}") from None
        interval = None
        if isinstance(check, PollingCheck):
            interval = (cfg.interval if cfg else None) or cls.interval
        timeout = (cfg.timeout if cfg else None) or cls.timeout
        planned.append(
            PlannedCheck(
                name,
                enabled,
                check,
                interval,
                timeout,
                check.missing() if enabled else [],
                None,
                cls.description,
            )
        )
    return planned
