"""deploy/config.example.yaml and the README's settings table come from the settings model:
stale copies fail here (`python -m agent.settings_doc` rewrites both)."""

from __future__ import annotations

import importlib
import re

from pydantic import BaseModel, Field

from agent import settings_doc
from agent.config import load_settings
from checks import registry
from checks.units import Duration

STALE = "stale: run `python -m agent.settings_doc` and commit the result"


def test_the_example_config_is_current() -> None:
    assert settings_doc.EXAMPLE.read_text() == settings_doc.example_yaml(settings_doc.roots()), (
        STALE
    )


def test_the_readme_settings_table_is_current() -> None:
    readme = settings_doc.README.read_text()
    assert readme == settings_doc.readme_with_table(readme, settings_doc.roots()), STALE


def test_every_setting_says_what_it_means() -> None:
    def leaves(entries: list[settings_doc.Entry]) -> list[settings_doc.Entry]:
        return [x for e in entries for x in (leaves(e.children) if e.children else [e])]

    assert [e.dotted for e in leaves(settings_doc.roots()) if not e.description] == []


def test_the_example_loads_with_its_example_values() -> None:
    settings = load_settings(settings_doc.EXAMPLE)
    assert settings.host_root.as_posix() == "/host" and settings.cluster_name == "my-cluster"
    assert settings.kubernetes.max_unschedulable == 20
    assert settings.policy.rules[0].name == "memory-exhaustion-is-the-nodes-problem"


class _Inner(BaseModel):
    """A section a new feature adds."""

    wait: Duration = Field(90.0, description="how long")


class _Outer(BaseModel):
    name: str | None = Field(None, description="who", examples=["gpu-1"])
    inner: _Inner = _Inner()


def test_a_new_section_is_rendered_without_touching_the_renderer() -> None:
    entries = settings_doc.entries(_Outer)
    assert settings_doc.table(entries).splitlines()[2:] == [
        "| `name` | unset | who |",
        "| `inner.wait` | `90s` | how long |",
    ]
    assert settings_doc.example_yaml(entries).split("\n\n", 1)[1] == (
        "# who (default: unset)\nname: gpu-1\n\n# A section a new feature adds.\ninner:\n"
        "  # how long\n  wait: 90s\n"
    )


def documented_check_options() -> set[tuple[str, str]]:
    """(check, option) of every key the README's hand-kept Check options table names: a row
    starts with `checks.<name>.<option>`; `.<option>` cells after it are the same check's."""
    readme = settings_doc.README.read_text()
    section = readme.split("\n### Check options\n", 1)[1].split("\n## ", 1)[0]
    found = set()
    for row in section.splitlines():
        if not row.startswith("| `checks."):
            continue
        name = ""
        for token in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if token.startswith("checks."):
                _, name, option = token.split(".", 2)
            else:
                option = token.removeprefix(".")
            found.add((name, option))
    return found


def test_the_check_options_table_names_every_option_and_no_other() -> None:
    declared = set()
    for name, ref in registry.BUILTIN.items():
        module, cls = ref.split(":")
        options = getattr(importlib.import_module(module), cls).Options
        declared |= {(name, option) for option in (options.model_fields if options else ())}
    assert documented_check_options() == declared
