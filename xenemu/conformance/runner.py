"""Run rules against a target and give each an honest verdict.

Every rule gets a fresh ``Target`` session (its own control connection, the domains it creates
destroyed after it); a rule whose host options or capabilities the target lacks is *not
checked*, with the reason, and never counted as passed. A pass also needs the target's audit
clean once the case has cleaned up.
"""

from __future__ import annotations

import linecache
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenemu.client import ConnectionLost, SyncControlClient, XenError
from xenemu.conformance.rules import Rule
from xenemu.conformance.target import NotChecked, Target

PASS, FAIL, NOT_CHECKED = "pass", "fail", "not checked"


@dataclass(frozen=True)
class Result:
    rule: Rule
    verdict: str
    detail: str
    seconds: float


@dataclass(frozen=True)
class Sockets:
    control: Path
    hypercall: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Sockets:
        return cls(directory / "control.sock", directory / "hypercall.sock")


def host_options(sockets: Sockets) -> dict[str, Any]:
    """The target's host options, as ``host_info`` reports them."""
    with SyncControlClient.connect(sockets.control) as ctl:
        options: dict[str, Any] = dict(ctl.host_info().get("options", {}))
    return options


def describe_failure(exc: BaseException) -> str:
    """One line: the assertion's message, or the line of the case that failed."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, AssertionError) and not message:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/conformance/" in f.filename]
        if frames:
            where = frames[-1]
            message = (linecache.getline(where.filename, where.lineno or 0).strip() or "assertion failed")[:160]
    kind = "" if isinstance(exc, AssertionError) else f"{type(exc).__name__}: "
    return (kind + message)[:300] or type(exc).__name__


def run_one(rule: Rule, sockets: Sockets, options: dict[str, Any]) -> Result:
    start = time.monotonic()

    def result(verdict: str, detail: str) -> Result:
        return Result(rule, verdict, detail, time.monotonic() - start)

    reason = rule.unmet(options)
    if reason is not None:
        return result(NOT_CHECKED, reason)
    try:
        target = Target(sockets.control, sockets.hypercall)
    except (OSError, XenError, ConnectionLost) as exc:
        return result(FAIL, f"cannot open the target: {describe_failure(exc)}")
    verdict, detail = PASS, ""
    try:
        rule.check(target)
    except NotChecked as exc:
        verdict, detail = NOT_CHECKED, str(exc)
    except Exception as exc:
        verdict, detail = FAIL, describe_failure(exc)
    try:
        target.close()
        if verdict != FAIL:
            with SyncControlClient.connect(sockets.control) as ctl:
                problems = ctl.audit()
            if problems:
                verdict, detail = FAIL, "audit after the case: " + "; ".join(problems)[:250]
    except Exception as exc:
        if verdict != FAIL:
            verdict, detail = FAIL, f"cleaning up: {describe_failure(exc)}"
    return result(verdict, detail)


def run(rules: Sequence[Rule], sockets: Sockets, progress: Callable[[Result], None] | None = None) -> list[Result]:
    options = host_options(sockets)
    results = []
    for rule in rules:
        outcome = run_one(rule, sockets, options)
        results.append(outcome)
        if progress is not None:
            progress(outcome)
    return results


def counts(results: Iterable[Result]) -> dict[str, int]:
    tally = {PASS: 0, FAIL: 0, NOT_CHECKED: 0}
    for r in results:
        tally[r.verdict] += 1
    return tally


def exit_status(results: Sequence[Result]) -> int:
    """1 on any failure; 2 when nothing was checked at all (a suite that skipped everything
    proved nothing); else 0."""
    tally = counts(results)
    if tally[FAIL]:
        return 1
    if not tally[PASS]:
        return 2
    return 0
