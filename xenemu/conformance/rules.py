"""Rules, not test names: each case is registered under the rule it checks.

A rule's id (``IOMMU-MAP-STATUS``) names its family (the part before the first dash) and
points at the PROTOCOL.md section that states it (section 12 lists every rule with the
section of the specification it comes from). A rule may need host options (``host``: the
daemon must run with them, as ``host_info`` reports) or capabilities (``needs``:
``fault_injection``); on a target without them it is not checked, and says why.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], None]


@dataclass(frozen=True)
class Rule:
    id: str
    section: str
    summary: str
    check: Check
    host: Mapping[str, Any] = field(default_factory=dict)
    needs: frozenset[str] = frozenset()
    #: Written against ``target.Bed`` alone, so the test suite also runs it on the core.
    core: bool = False

    @property
    def family(self) -> str:
        return self.id.split("-", 1)[0].lower()

    def unmet(self, options: Mapping[str, Any]) -> str | None:
        """Why this rule cannot be checked on a target started with ``options``, or None."""
        for key, want in self.host.items():
            have = options.get(key)
            if have != want:
                return f"needs host option {key}={want!r}; the target has {have!r}"
        for need in sorted(self.needs):
            if not options.get(need):
                return f"the target has no {need.replace('_', ' ')} (host_info options.{need})"
        return None


RULES: dict[str, Rule] = {}


def rule(
    rule_id: str,
    section: str,
    summary: str,
    *,
    host: Mapping[str, Any] | None = None,
    needs: Iterable[str] = (),
    core: bool = False,
) -> Callable[[Check], Check]:
    """Register the decorated case as the check of ``rule_id``."""

    def register(check: Check) -> Check:
        assert rule_id not in RULES, f"rule {rule_id} registered twice"
        RULES[rule_id] = Rule(rule_id, section, summary, check, dict(host or {}), frozenset(needs), core)
        return check

    return register


def select(rules: Iterable[Rule], patterns: Iterable[str]) -> list[Rule]:
    """Rules matching any pattern: a family (``grant``), a glob over ids (``IOMMU-MAP-*``) or a
    substring of an id; a pattern starting with ``not `` or ``-`` excludes what it matches."""
    wanted = [p.strip() for pattern in patterns for p in pattern.split(",") if p.strip()]
    include = [p for p in wanted if not p.startswith(("-", "not "))]
    exclude = [p.removeprefix("not ").removeprefix("-").strip() for p in wanted if p not in include]

    def matches(r: Rule, pattern: str) -> bool:
        p = pattern.lower()
        rid = r.id.lower()
        return r.family == p or fnmatch.fnmatchcase(rid, p) or ("*" not in p and p in rid)

    chosen = [r for r in rules if not include or any(matches(r, p) for p in include)]
    return [r for r in chosen if not any(matches(r, p) for p in exclude)]
