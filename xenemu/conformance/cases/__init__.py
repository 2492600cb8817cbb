"""The cases, one module per family of rules: the protocol itself (framing, handshake, errors),
PV IOMMU subops and flushing, foreign subops, ballooning and IOREQ invalidates, grants, the
vITS. Each case is a function registered with ``rules.rule`` under the rule it checks."""

from __future__ import annotations

import importlib

FAMILIES = ("protocol", "iommu", "foreign", "flush", "balloon", "grants", "its")


def load() -> None:
    for family in FAMILIES:
        importlib.import_module(f"xenemu.conformance.cases.{family}")
