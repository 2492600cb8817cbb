"""Every rule of the conformance suite, on xenemu: one test per rule and bed.

The daemon beds run the product's own runner (``run_one``), so a rule passes here exactly when
``xenemu conformance`` would report it passed against that daemon; the core beds run the rules
written against ``Bed`` on the core in-process.
"""

from __future__ import annotations

import pytest

from tests.conformance.beds import CoreBed
from tests.conformance.conftest import BASE, Daemons
from xenemu.conformance.cases import all_rules
from xenemu.conformance.rules import Rule
from xenemu.conformance.runner import PASS, Sockets, host_options, run_one

RULES = all_rules()
FAST = pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])


@FAST
@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_rule_on_a_daemon(daemons: Daemons, rule: Rule, fast: bool) -> None:
    daemon = daemons.get({**BASE, **rule.host, "fast_path": fast})
    sockets = Sockets(daemon.control_path, daemon.hypercall_path)
    result = run_one(rule, sockets, host_options(sockets))
    assert result.verdict == PASS, f"{rule.id}: {result.verdict}: {result.detail}"


@FAST
@pytest.mark.parametrize("rule", [r for r in RULES if r.core], ids=[r.id for r in RULES if r.core])
def test_rule_on_the_core(rule: Rule, fast: bool) -> None:
    bed = CoreBed(**{**BASE, **rule.host, "fast_path": fast})
    rule.check(bed)
    assert bed.audit() == []


def test_every_rule_names_a_section_of_protocol_md_that_states_it() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "PROTOCOL.md").read_text()
    for rule in RULES:
        assert f"### {rule.section} " in text, f"{rule.id}: PROTOCOL.md has no section {rule.section}"
        assert f"`{rule.id}`" in text, f"{rule.id} is not stated in PROTOCOL.md"
