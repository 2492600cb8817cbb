"""The cases, one module per family of rules: the protocol itself (framing, handshake, errors),
PV IOMMU subops and flushing, foreign subops, ballooning and IOREQ invalidates, grants, the
vITS, live migration. Each case is a function registered with ``rules.rule`` under the rule it checks."""

from __future__ import annotations

import importlib

from xenemu.conformance.rules import RULES, Rule

FAMILIES = ("protocol", "iommu", "foreign", "flush", "balloon", "grants", "its", "migrate")


def all_rules() -> list[Rule]:
    """Every rule, in the order of FAMILIES and of the cases in each module."""
    for family in FAMILIES:
        importlib.import_module(f"xenemu.conformance.cases.{family}")
    return list(RULES.values())
