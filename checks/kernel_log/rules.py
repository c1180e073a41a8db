"""Kernel-log rules as data: the model of a rule, the packaged table, and compiling them.

A rule says which lines it is about (`anchor`, a literal every such line contains, and
`pattern`, a regex searched in the record) and what such a line means (condition, reason,
component, action). Templates (`reason`, `component`) take the pattern's named groups:
`gpu:{pci}`. A group named `pci` is normalised to `dddd:bb:dd`, lower case, so the same GPU
reads the same whether a line printed its function number or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from checks.api import Action, Duration, load_yaml

PACKAGE = "checks.kernel_log"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class Lookup(Strict):
    """Look `key` (a template) up in `table`; a hit replaces the rule's action (and reason)."""

    table: str
    key: str


class Rate(Strict):
    """`count` matches within `window` on one component turn the rule's action into `action`."""

    count: int = Field(ge=2)
    window: Duration
    action: Action


class Rule(Strict):
    name: str
    anchor: str = Field(min_length=3)
    pattern: str
    condition: str | None = None  # None only for context rules, which report nothing
    reason: str = ""
    component: str = "node"
    component_fallback: str = "node"  # when a group the component names did not match
    temporary: bool = True  # an event; false: a condition that holds until cleared
    action: Action = Action.NONE
    lookup: list[Lookup] = Field(default_factory=list)
    rate: Rate | None = None
    context: str | None = Field(None, description="remember this match for uses_context")
    uses_context: str | None = None
    dedup: Duration | None = Field(None, description="override of the table's dedup window")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value, re.DOTALL)  # as _compile will: the second compile is a cache hit
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    def model_post_init(self, _: Any) -> None:
        if self.condition is None and self.context is None:
            raise ValueError(f"rule {self.name!r} needs a condition (or be a context rule)")


class RuleFile(Strict):
    tables: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    dedup: Duration = 2.0


@dataclass(frozen=True)
class TableHit:
    action: Action
    reason: str | None = None
    evidence: dict[str, str] = field(default_factory=dict)


@dataclass
class CompiledRule:
    rule: Rule
    regex: re.Pattern[str]
    fields: tuple[str, ...]  # the groups `component` needs


@dataclass
class RuleSet:
    """Rules ready to run: each anchor with the rules that need it, in table order."""

    rules: list[CompiledRule]
    tables: dict[str, dict[str, TableHit]]
    dedup: float
    anchors: list[str] = field(init=False)
    by_anchor: dict[str, list[CompiledRule]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_anchor = {}
        for cr in self.rules:
            self.by_anchor.setdefault(cr.rule.anchor, []).append(cr)
        self.anchors = list(self.by_anchor)

    def candidates(self, text: str) -> list[CompiledRule]:
        """The rules whose anchor `text` holds, in table order."""
        return [cr for cr in self.rules if cr.rule.anchor in text]


class RuleError(ValueError):
    """A rules file that cannot be used; the message names the file and the rule."""


def packaged() -> RuleFile:
    return _parse(resources.files(PACKAGE).joinpath("rules.yaml").read_text(), "rules.yaml")


def load_file(path: Path) -> RuleFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RuleError(f"{path}: {exc.strerror}") from None
    return _parse(text, str(path))


def _parse(text: str, where: str) -> RuleFile:
    try:
        return RuleFile.model_validate(load_yaml(text) or {})
    except yaml.YAMLError as exc:
        raise RuleError(f"{where}: {exc}") from None
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise RuleError(f"{where}: {detail}") from None


def build(
    extra: list[RuleFile] | None = None,
    disabled: set[str] | frozenset[str] = frozenset(),
    dedup: float | None = None,
) -> RuleSet:
    """The packaged table with `extra` files' rules first and `disabled` rule names left out."""
    base = packaged()
    files = [*(extra or []), base]
    rules = [r for f in files for r in f.rules if r.name not in disabled]
    tables: dict[str, dict[str, Any]] = {}
    for f in reversed(files):  # an extra file's table replaces a packaged one of that name
        tables.update(f.tables)
    compiled_tables = {name: _table(name, t) for name, t in tables.items()}
    compiled_tables["xid"] = _xid_table(tables.get("xid_bucket", {}))
    for r in rules:
        for lk in r.lookup:
            if lk.table not in compiled_tables:
                raise RuleError(f"rule {r.name!r}: no table {lk.table!r}")
    return RuleSet(
        [_compile(r) for r in rules], compiled_tables, base.dedup if dedup is None else dedup
    )


def _compile(rule: Rule) -> CompiledRule:
    regex = re.compile(rule.pattern, re.DOTALL)
    fields = tuple(re.findall(r"{(\w+)}", rule.component))
    unknown = [
        f for f in (*fields, *re.findall(r"{(\w+)}", rule.reason)) if f not in regex.groupindex
    ]
    if unknown:
        raise RuleError(f"rule {rule.name!r}: template names {unknown} not in its pattern")
    return CompiledRule(rule, regex, fields)


def _table(name: str, raw: dict[str, Any]) -> dict[str, TableHit]:
    out = {}
    for key, value in raw.items():
        if isinstance(value, str):
            value = {"action": value}
        try:
            out[str(key)] = TableHit(Action(value["action"]), value.get("reason"))
        except (KeyError, ValueError, TypeError):
            raise RuleError(
                f"table {name!r}, key {key!r}: needs an action "
                f"({', '.join(a.value for a in Action)})"
            ) from None
    return out


def _xid_table(buckets: dict[str, Any]) -> dict[str, TableHit]:
    """NVIDIA's catalog (code -> bucket) through `xid_bucket` (bucket -> action)."""
    catalog = load_yaml(resources.files(PACKAGE).joinpath("xid_catalog.yaml").read_text())
    out = {}
    for code, (mnemonic, bucket) in catalog["codes"].items():
        if bucket not in buckets:
            raise RuleError(f"xid_bucket has no action for NVIDIA's bucket {bucket!r}")
        out[str(code)] = TableHit(
            Action(buckets[bucket]), None, {"mnemonic": mnemonic, "nvidia_bucket": bucket}
        )
    return out


PCI = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})(?:\.[0-7])?$")


def normalize_pci(value: str) -> str:
    """`0000:B9:00.0` -> `0000:b9:00`; an address of another shape is kept as it is."""
    m = PCI.match(value.lower())
    if not m:
        return value
    return f"{m.group(1) or '0000'}:{m.group(2)}:{m.group(3)}"
