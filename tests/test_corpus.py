"""Score the agent on the corpus of real kernel logs and tool outputs (tests/corpus/cases.yaml):
each log runs through the packaged rules and policy as `node-health scan` would judge it, each
tool output (a case with `tool`) through `scan` itself, which must recognise it as that kind;
the node's verdict must be the expected one. The table is printed (pytest -s shows it)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent import scan
from agent.identity import Identity
from agent.policy import DeepCheckWanted, Policy, PolicySettings, rule_table
from checks.api import load_yaml
from checks.kernel_log import rules
from checks.kernel_log.classifier import Classifier

TESTS = Path(__file__).parent
CORPUS = TESTS / "corpus"
CASES = load_yaml((CORPUS / "cases.yaml").read_text())["cases"]


def path_of(case: dict) -> Path:
    return CORPUS / "logs" / case["log"] if "log" in case else TESTS / case["file"]


def judge(ruleset: rules.RuleSet, data: bytes) -> tuple[str, bool]:
    """The verdict after the whole log, and whether a deep check was asked for."""
    findings = list(Classifier(ruleset).bulk(data))
    ps = PolicySettings()
    policy = Policy(rule_table(ps), ps)
    changes = policy.observe(findings, log_time=True)
    return str(policy.verdict), any(isinstance(c, DeepCheckWanted) for c in changes)


def judge_tool(ruleset: rules.RuleSet, case: dict) -> tuple[str, bool]:
    """The verdict `scan` gives a saved tool output, with the case's instance type."""
    with path_of(case).open("rb") as fh:
        result = scan.scan(
            fh,
            ruleset,
            PolicySettings(),
            Identity("corpus"),
            io.StringIO(),
            engine="re",
            instance_type=case.get("instance_type"),
        )
    assert case["tool"] in result.recognised, (path_of(case).name, result.recognised)
    return str(result.verdict), False


def test_every_case_has_a_source_and_its_log() -> None:
    for case in CASES:
        assert path_of(case).is_file(), case
        assert "log" not in case or case["source"].startswith("https://"), case
    on_disk = {p.name for p in (CORPUS / "logs").glob("*.log")}
    assert on_disk == {c["log"] for c in CASES if "log" in c}


def test_corpus_score() -> None:
    ruleset = rules.build()
    rows, wrong = [], []
    for case in CASES:
        if "tool" in case:
            verdict, wanted = judge_tool(ruleset, case)
        else:
            verdict, wanted = judge(ruleset, path_of(case).read_bytes())
        ok = verdict == case["expect"] and wanted == case.get("deep_check", False)
        rows.append((path_of(case).name, case["class"], case["expect"], verdict, wanted, ok))
        if not ok:
            wrong.append(rows[-1])
    width = max(len(r[0]) for r in rows)
    print(f"\n{'case':{width}}  {'class':22} {'expected':32} {'got':32} deep  ok")
    for name, cls, expect, got, wanted, ok in rows:
        print(
            f"{name:{width}}  {cls:22} {expect:32} {got:32} {'yes' if wanted else 'no':5} "
            f"{'ok' if ok else 'WRONG'}"
        )
    right = len(rows) - len(wrong)
    print(f"score: {right}/{len(rows)} right")
    if wrong:
        pytest.fail(f"{len(wrong)} wrong: {[w[0] for w in wrong]}")
