"""The report: a table for a person (rich), JUnit XML and JSON for CI and programs."""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xenemu.conformance.runner import FAIL, NOT_CHECKED, PASS, Result, counts

STYLE = {PASS: "green", FAIL: "bold red", NOT_CHECKED: "yellow"}


def table(results: Sequence[Result], title: str = "conformance") -> Any:
    from rich.table import Table

    grid = Table(title=title, show_lines=False)
    grid.add_column("rule", no_wrap=True)
    grid.add_column("§", no_wrap=True)
    grid.add_column("verdict", no_wrap=True)
    grid.add_column("detail")
    for r in results:
        detail = r.detail or r.rule.summary
        grid.add_row(r.rule.id, r.rule.section, f"[{STYLE[r.verdict]}]{r.verdict}[/]", detail)
    return grid


def summary(results: Sequence[Result], seconds: float) -> str:
    tally = counts(results)
    return (
        f"{tally[PASS]} passed, {tally[FAIL]} failed, {tally[NOT_CHECKED]} not checked "
        f"({len(results)} rules) in {seconds:.1f} s"
    )


def as_json(results: Sequence[Result], seconds: float, target: dict[str, Any]) -> dict[str, Any]:
    return {
        "target": target,
        "seconds": round(seconds, 3),
        "counts": counts(results),
        "results": [
            {
                "rule": r.rule.id,
                "family": r.rule.family,
                "section": f"PROTOCOL.md {r.rule.section}",
                "summary": r.rule.summary,
                "verdict": r.verdict,
                "detail": r.detail,
                "seconds": round(r.seconds, 3),
            }
            for r in results
        ],
    }


def write_json(path: Path, results: Sequence[Result], seconds: float, target: dict[str, Any]) -> None:
    path.write_text(json.dumps(as_json(results, seconds, target), indent=2) + "\n")


def write_junit(path: Path, results: Sequence[Result], seconds: float) -> None:
    """One testcase per rule (classname: its family); not checked is JUnit's ``skipped``."""
    tally = counts(results)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name="xenemu-conformance",
        tests=str(len(results)),
        failures=str(tally[FAIL]),
        errors="0",
        skipped=str(tally[NOT_CHECKED]),
        time=f"{seconds:.3f}",
        hostname=platform.node(),
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname=f"conformance.{r.rule.family}", name=r.rule.id, time=f"{r.seconds:.3f}"
        )
        if r.verdict == FAIL:
            ET.SubElement(case, "failure", message=r.detail).text = f"{r.rule.summary}\n{r.detail}"
        elif r.verdict == NOT_CHECKED:
            ET.SubElement(case, "skipped", message=r.detail)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
