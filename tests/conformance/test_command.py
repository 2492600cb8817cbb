"""``xenemu conformance`` as a user runs it: verdicts, exit status, reports, selection, self-test."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from tests.conformance.conftest import BASE, Daemons, daemon_flags
from xenemu.conformance.cases import all_rules


def conformance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenemu", "conformance", *args], capture_output=True, text=True, timeout=300
    )


def test_the_whole_suite_against_xenemu_with_reports(daemons: Daemons, tmp_path: Path) -> None:
    daemon = daemons.get(dict(BASE))
    run = conformance(str(daemon.directory), "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml"))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    rules = all_rules()
    unmet = [r for r in rules if r.unmet(report["target"]["options"])]
    assert report["counts"] == {"pass": len(rules) - len(unmet), "fail": 0, "not checked": len(unmet)}
    assert {r["rule"] for r in report["results"] if r["verdict"] == "not checked"} == {r.id for r in unmet}
    assert all(r["detail"].startswith("needs host option") for r in report["results"] if r["verdict"] != "pass")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(len(rules)) and suite.get("skipped") == str(len(unmet))
    assert "passed, 0 failed" in run.stdout


def test_without_fault_injection_those_rules_are_not_checked(daemons: Daemons) -> None:
    daemon = daemons.get({**BASE, "fault_injection": False})
    control, hypercall = str(daemon.control_path), str(daemon.hypercall_path)
    run = conformance(control, hypercall, "--json", "-", "-k", "EIO,FAULT,proto")
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(run.stdout)["results"]
    skipped = {r["rule"]: r["detail"] for r in results if r["verdict"] == "not checked"}
    assert set(skipped) == {"IOMMU-MAP-EIO", "IOMMU-UNMAP-EIO", "FOREIGN-MAP-EIO", "FOREIGN-UNMAP-EIO", "GRANT-FAULT"}
    assert all("fault injection" in why for why in skipped.values())
    assert {r["verdict"] for r in results if r["rule"].startswith("PROTO-")} == {"pass"}


def test_nothing_checked_is_not_a_pass(daemons: Daemons) -> None:
    daemon = daemons.get(dict(BASE))
    run = conformance(str(daemon.directory), "-k", "IOMMU-NO-IOMMU,FOREIGN-NO-IOMMU")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "0 passed, 0 failed, 2 not checked" in run.stdout


def test_a_broken_daemon_fails_with_the_rule_named(tmp_path: Path) -> None:
    daemon = DaemonProcess(
        tmp_path, *daemon_flags({**BASE, "fast_path": False}), env={"XENEMU_MUTANT": "bad-token-kept"}
    )
    try:
        run = conformance(str(tmp_path), "-k", "proto", "--json", "-")
    finally:
        daemon.stop()
    assert run.returncode == 1, run.stdout + run.stderr
    failed = [r for r in json.loads(run.stdout)["results"] if r["verdict"] == "fail"]
    assert [r["rule"] for r in failed] == ["PROTO-BAD-TOKEN"] and "close" in failed[0]["detail"]
    assert "bad-token-kept" in daemon.log_text()  # a mutant says what it is


def test_selection_lists_families_and_ids() -> None:
    listed = conformance("--list", "-k", "grant", "-k", "ITS-REG*", "-k", "not GRANT-FAULT").stdout
    ids = [line.split()[0] for line in listed.splitlines()]
    assert ids and all(i.startswith("GRANT-") or i == "ITS-REGISTERS" for i in ids) and "GRANT-FAULT" not in ids
    assert conformance("-k", "no-such-rule").returncode == 2


def test_a_missing_target_is_one_line() -> None:
    run = conformance("/nonexistent/dir")
    assert run.returncode == 2 and "no socket at" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("mutant", "family", "status", "caught"),
    [("stalled-its-queue", "its", 0, "ITS-BRINGUP"), ("grant-status", "proto", 1, "a gap")],
)
def test_self_test_names_the_rule_that_caught_each_mutation(mutant: str, family: str, status: int, caught: str) -> None:
    run = conformance("--self-test", "--mutant", mutant, "-k", family)
    assert run.returncode == status, run.stdout + run.stderr
    assert caught in run.stdout


def test_the_self_test_and_the_daemon_know_the_same_mutants(tmp_path: Path) -> None:
    from xenemu.conformance.selftest import MUTANTS
    from xenemu.server.mutants import MUTANTS as IMPLEMENTED

    assert set(MUTANTS) == set(IMPLEMENTED)
    with pytest.raises(RuntimeError, match="unknown mutant"):
        DaemonProcess(tmp_path, "--no-fast-path", env={"XENEMU_MUTANT": "no-such-mutant"})
