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

from checks.api import Action, load_yaml, seconds

PACKAGE = "checks.kernel_log"


# Stdlib dataclasses, so that `node-health scan` never loads pydantic: the packaged table is
# built directly; a rules file from the settings is validated by pydantic all the same.
_STRICT = {"extra": "forbid"}


@dataclass(frozen=True)
class Lookup:
    """Look `key` (a template) up in `table`; a hit replaces the rule's action (and reason)."""

    __pydantic_config__ = _STRICT

    table: str
    key: str


@dataclass(frozen=True)
class Rate:
    """`count` matches within `window` on one component turn the rule's action into `action`."""

    __pydantic_config__ = _STRICT

    count: int
    window: float | str
    action: Action

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError("rate.count must be at least 2")
        object.__setattr__(self, "window", seconds(self.window, "rate.window"))
        object.__setattr__(self, "action", Action(self.action))


@dataclass(frozen=True)
class Rule:
    """One rule. `context` rules report nothing: they lend their groups to the next finding of
    a rule with the same `uses_context`; `sets_context` does the same for a rule that also
    reports. `unless_context` drops the finding while that context is fresh (a crash someone
    asked for is no fault). `component_fallback` stands in when a group the component names
    did not match; `dedup` overrides the table's window (lines within it are counted)."""

    __pydantic_config__ = _STRICT

    name: str
    anchor: str
    pattern: str
    condition: str | None = None
    reason: str = ""
    component: str = "node"
    component_fallback: str = "node"
    temporary: bool = True
    action: Action = Action.NONE
    lookup: list[Lookup] = field(default_factory=list)
    rate: Rate | None = None
    context: str | None = None
    uses_context: str | None = None
    sets_context: str | None = None
    unless_context: str | None = None
    dedup: float | str | None = None
    severity: str | None = None  # info, warn or error; default: from the action

    def __post_init__(self) -> None:
        where = f"rule {self.name!r}"
        if self.severity not in (None, "info", "warn", "error"):
            raise ValueError(f"{where}: severity must be info, warn or error")
        if len(self.anchor) < 3:
            raise ValueError(f"{where}: anchor must be at least 3 characters")
        if self.condition is None and self.context is None:
            raise ValueError(f"{where} needs a condition (or be a context rule)")
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(
            self, "lookup", [Lookup(**lk) if isinstance(lk, dict) else lk for lk in self.lookup]
        )
        if isinstance(self.rate, dict):
            object.__setattr__(self, "rate", Rate(**self.rate))
        if self.dedup is not None:
            object.__setattr__(self, "dedup", seconds(self.dedup, f"{where}: dedup"))


@dataclass(frozen=True)
class RuleFile:
    __pydantic_config__ = _STRICT

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    dedup: float | str = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "rules", [Rule(**r) if isinstance(r, dict) else r for r in self.rules]
        )
        object.__setattr__(self, "dedup", seconds(self.dedup, "dedup"))


@dataclass(frozen=True)
class TableHit:
    action: Action
    reason: str | None = None
    evidence: dict[str, str] = field(default_factory=dict)


@dataclass
class CompiledRule:
    rule: Rule
    fields: tuple[str, ...]  # the groups `component` needs
    _regex: re.Pattern[str] | None = None

    @property
    def regex(self) -> re.Pattern[str]:
        """Compiled on first use: a log touches few of the rules, and start-up is a scan's
        largest cost. Every pattern is compiled once when a table is built (`build`)."""
        if self._regex is None:
            self._regex = re.compile(self.rule.pattern, re.DOTALL)
        return self._regex


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
    """The packaged table, built directly (its validity is a test's business)."""
    raw = load_yaml(resources.files(PACKAGE).joinpath("rules.yaml").read_text())
    return RuleFile(**raw)


def load_file(path: Path) -> RuleFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RuleError(f"{path}: {exc.strerror}") from None
    return validate(text, str(path))


def validate(text_or_data: str | dict[str, Any], where: str) -> RuleFile:
    """A rules file (YAML text, or its data) validated with pydantic; errors name the rule."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    try:
        raw = load_yaml(text_or_data) if isinstance(text_or_data, str) else text_or_data
        checked = TypeAdapter(RuleFile).validate_python(raw or {})
        for rule in checked.rules:
            try:
                re.compile(rule.pattern, re.DOTALL)
            except re.error as exc:
                raise RuleError(
                    f"{where}: rule {rule.name!r}: pattern is not a valid regular expression: {exc}"
                ) from None
        return checked
    except yaml.YAMLError as exc:
        raise RuleError(f"{where}: {exc}") from None
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}".lstrip(": ") for e in exc.errors()
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


_GROUP = re.compile(r"\(\?P<(\w+)>")


def _compile(rule: Rule) -> CompiledRule:
    fields = tuple(re.findall(r"{(\w+)}", rule.component))
    groups = set(_GROUP.findall(rule.pattern))
    unknown = [f for f in (*fields, *re.findall(r"{(\w+)}", rule.reason)) if f not in groups]
    if unknown and rule.uses_context is None:  # a context lends groups of its own
        raise RuleError(f"rule {rule.name!r}: template names {unknown} not in its pattern")
    return CompiledRule(rule, fields)


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
    """NVIDIA's catalog (code -> bucket) through `xid_bucket` (bucket -> action and reason)."""
    catalog = load_yaml(resources.files(PACKAGE).joinpath("xid_catalog.yaml").read_text())
    by_bucket = _table("xid_bucket", buckets)
    out = {}
    for code, (mnemonic, bucket) in catalog["codes"].items():
        if bucket not in by_bucket:
            raise RuleError(f"xid_bucket has no action for NVIDIA's bucket {bucket!r}")
        hit = by_bucket[bucket]
        out[str(code)] = TableHit(
            hit.action, hit.reason, {"mnemonic": mnemonic, "nvidia_bucket": bucket}
        )
    return out


PCI = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})(?:\.[0-7])?$")


def normalize_pci(value: str) -> str:
    """`0000:B9:00.0` -> `0000:b9:00`; an address of another shape is kept as it is."""
    m = PCI.match(value.lower())
    if not m:
        return value
    return f"{m.group(1) or '0000'}:{m.group(2)}:{m.group(3)}"
