"""Settings: a YAML file (`--config` / NODE_HEALTH_CONFIG) and NODE_HEALTH_* variables.

Environment variables win over the file; nested keys use `__`
(`NODE_HEALTH_CHECKS__MEMORY__INTERVAL=10`). Any error names the key and the CLI exits 2.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from agent.models import (
    CheckSettings,
    CloudWatchSettings,
    ControllerSettings,
    DeepCheckSettings,
    KubernetesSettings,
    MqttSettings,
    NodeKeys,
    SpoolSettings,
)
from agent.policy import PolicyRule, PolicySettings, RuleMatch
from checks.api import Check
from checks.units import Duration

__all__ = [
    "CheckSettings",
    "NodeKeys",
    "PolicyRule",
    "PolicySettings",
    "RuleMatch",
    "SpoolSettings",
]


class ConfigError(ValueError):
    """A configuration problem, already phrased for the operator."""


def default_state_dir() -> Path:
    """Where spool and state live by default: the XDG state dir, so no root is needed."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "node-health"


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NODE_HEALTH_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    node_name: str | None = Field(
        None,
        validation_alias=AliasChoices("node_name", "NODE_HEALTH_NODE_NAME", "NODE_NAME"),
        description="the Node this agent speaks for (downward API)",
        json_schema_extra={"default_text": "`$NODE_NAME`, else the hostname"},
    )
    instance_id: str | None = Field(
        None,
        description="the instance",
        json_schema_extra={"default_text": "from IMDSv2 on EC2"},
    )
    instance_type: str | None = Field(
        None,
        description="the instance type: what a healthy node has (checks/instance_types.yaml)",
        json_schema_extra={"default_text": "from IMDSv2 on EC2"},
    )
    region: str | None = Field(
        None,
        description="the instance's region",
        json_schema_extra={"default_text": "from IMDSv2 on EC2"},
    )
    cluster_name: str | None = Field(
        None, description="names the CloudWatch log group", examples=["my-cluster"]
    )
    cluster_id: str | None = Field(
        None, description="names the CloudWatch log group", examples=["abcd1234efgh"]
    )
    node_group: str | None = Field(
        None, description="names the CloudWatch log stream", examples=["gpu-workers"]
    )

    host_root: Path = Field(
        Path("/"),
        description="every /proc, /sys, /dev and log path is read under it (/host in a container)",
        examples=["/host"],
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="spool, node state, policy state",
        json_schema_extra={"default_text": "`~/.local/state/node-health`"},
        examples=["/var/lib/node-health"],
    )
    dry_run: bool = Field(False, description="report, change nothing on the node")
    imds: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto asks IMDSv2 only when the host's DMI data says EC2; on; off",
    )
    imds_endpoint: str = Field("http://169.254.169.254", description="where IMDS answers")
    imds_timeout: Duration = Field(1.0, description="how long one IMDS request may take")
    http_listen: str = Field(
        "127.0.0.1:9870",
        description="host:port of /healthz, /readyz, /metrics; empty turns it off",
        examples=["0.0.0.0:9870"],
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the agent's own logs (stderr): JSON, or readable on a terminal"
    )
    stop_timeout: Duration = Field(
        20.0,
        description="SIGTERM to exit at most; keep it under the pod's "
        "terminationGracePeriodSeconds (30s), or the kubelet kills the agent first",
    )
    stdout_events: bool = Field(True, description="events on stdout")
    spool: SpoolSettings = SpoolSettings()
    checks: dict[str, CheckSettings] = Field(
        default_factory=dict,
        description="per check: enabled, interval, timeout, and the check's own options "
        "(see Check options)",
        examples=[
            {
                "memory": {
                    "interval": "30s",
                    "available_min_percent": 5,
                    "polls": 3,
                    "action": "restart_app",
                }
            }
        ],
    )
    policy: PolicySettings = Field(
        PolicySettings(), description="the policy: what findings mean for the node (The policy)"
    )
    node_keys: NodeKeys = NodeKeys()
    deep_check: DeepCheckSettings = DeepCheckSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    cloudwatch: CloudWatchSettings = CloudWatchSettings()
    mqtt: MqttSettings = MqttSettings()
    controller: ControllerSettings = ControllerSettings()

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        """host:port (host a name or address, [v6] bracketed), so that a typo is a clear
        error at start rather than a failure deep in the server."""
        if value:
            parse_listen(value)
        return value

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError("not a directory")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get(None)
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=path) if path else None
        return tuple(s for s in (init_settings, env_settings, yaml_source) if s is not None)


_HOST = re.compile(r"[A-Za-z0-9_.-]{0,253}|\[[0-9A-Fa-f:.]+\]")


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a `host:port` listen address; ValueError, phrased, when it is none."""
    host, sep, port = listen.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not re.fullmatch(r"[0-9]{1,5}", port):
        raise ValueError(f"{listen!r} is not host:port (e.g. 127.0.0.1:9870, [::]:9870, :9870)")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    if host.startswith("["):
        ipaddress.IPv6Address(host[1:-1])  # its ValueError says what is wrong
    return host.strip("[]") or "0.0.0.0", int(port)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, phrasing every failure as a ConfigError that names the key."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    except Exception as exc:  # a YAML syntax error, an unreadable file
        raise ConfigError(f"cannot read {config_file}: {exc}") from None
    finally:
        _config_file.reset(token)


def check_options(name: str, cls: type[Check], cfg: CheckSettings | None) -> BaseModel:
    """Validate one check's own options against its model; errors name `checks.<name>.<key>`."""
    given = cfg.options if cfg else {}
    if cls.Options is None:
        if given:
            raise ConfigError(f"checks.{name}: takes no options (got {', '.join(given)})")
        return None
    try:
        return cls.Options.model_validate(given)
    except ValidationError as exc:
        raise ConfigError(describe(exc, prefix=("checks", name))) from None


def describe(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in (*prefix, *err["loc"])) or "(top level)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown setting")
        else:
            lines.append(f"{key}: {err['msg']}{got}")
    return "; ".join(lines)
