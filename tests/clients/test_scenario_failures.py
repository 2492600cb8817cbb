"""A failing scenario says ``VERDICT: FAIL: REASON``, exits non-zero, and does so promptly.

Each test breaks one participant of a real scenario (the real daemon, the real programs, run by
compose_local from docker-compose.yml with an override file, as ``docker compose -f A -f B``
would) and checks the verdict's reason. The verdict's own timeout stays at its default (300 s):
a run that ends within a minute proves the failure was noticed, not waited out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients"))

import compose_local  # noqa: E402

from tests.conformance.beds import DaemonProcess  # noqa: E402
from xenemu.client import SyncControlClient  # noqa: E402

COMPOSE = ROOT / "docker-compose.yml"
#: Far below the verdict's 300 s default: the failure must be noticed, not timed out.
PROMPT = 60.0


def needs_compose() -> None:
    try:
        compose_local.compose_binary()
    except compose_local.ComposeError:
        pytest.skip("docker-compose is not installed")


def override(tmp_path: Path, services: dict[str, Any]) -> Path:
    """A second compose file (JSON is YAML) that changes some services, as ``-f`` would."""
    path = tmp_path / "override.json"
    path.write_text(json.dumps({"services": services}))
    return path


def service(profile: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = compose_local.resolved_config(COMPOSE, profile)["services"][name]
    return spec


def run(profile: str, files: list[Path], workdir: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    status, output = compose_local.run(profile, files, workdir, timeout=240)
    return status, "\n".join(output), time.monotonic() - started


def assert_failed(status: int, text: str, elapsed: float, reason: str, profile: str) -> None:
    verdicts = [line for line in text.splitlines() if "VERDICT:" in line]
    assert status != 0, text
    assert len(verdicts) == 1 and f"VERDICT: FAIL: {reason}" in verdicts[0], text
    assert verdicts[0].endswith(f"({profile})"), verdicts[0]
    assert "Traceback" not in text, text
    assert elapsed < PROMPT, f"took {elapsed:.1f} s"


def test_a_killed_guest_fails_the_scenario_at_once(tmp_path: Path) -> None:
    """SIGKILL the balloon guest while it runs: no result, no chance to write one."""
    needs_compose()
    lease = tmp_path / "xenemu-run" / "results" / "balloon.lock"
    killed: list[int] = []

    def kill_when_running() -> None:
        deadline = time.monotonic() + PROMPT
        while time.monotonic() < deadline:
            try:
                pid = int(json.loads(lease.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                time.sleep(0.01)
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    status, text, elapsed = run("mediated", [COMPOSE], tmp_path)
    killer.join()
    assert killed, text
    assert_failed(status, text, elapsed, f"balloon: died without a result (pid {killed[0]} on ", "mediated")
    assert "verdict-mediated exited with code 1" in text and status == 1


def daemon_pid(workdir: Path) -> int | None:
    """The pid of compose_local's ``xenemu serve`` for ``workdir`` (its argv names the volume)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(str(workdir).encode() in arg for arg in argv):
            return int(entry.name)
    return None


def test_a_dead_daemon_fails_the_scenario_with_that_reason(tmp_path: Path) -> None:
    """SIGKILL the daemon mid-scenario: Compose aborts (it is watched), the verdict says why."""
    needs_compose()
    lease = tmp_path / "xenemu-run" / "results" / "balloon.lock"
    killed: list[int] = []

    def kill_when_running() -> None:
        deadline = time.monotonic() + PROMPT
        while not lease.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the verdict is waiting by now
        pid = daemon_pid(tmp_path)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    status, text, elapsed = run("mediated", [COMPOSE], tmp_path)
    killer.join()
    assert killed, text
    assert "hypervisor exited with code 137\nAborting on container exit..." in text
    assert_failed(status, text, elapsed, "", "mediated")
    verdict = next(line for line in text.splitlines() if "VERDICT:" in line)
    assert "the daemon at " in verdict and "does not answer" in verdict, verdict
    assert status == 1  # the verdict's, as --exit-code-from verdict-mediated


def test_a_guest_the_daemon_refuses_fails_with_the_daemons_reason(tmp_path: Path) -> None:
    needs_compose()
    guest = service("pv-iommu", "pv-guest")
    command = list(guest["command"])
    command[command.index("--token") + 1] = "not-a-token"
    files = [COMPOSE, override(tmp_path, {"pv-guest": {"command": command}})]
    status, text, elapsed = run("pv-iommu", files, tmp_path)
    assert_failed(status, text, elapsed, "guest: XenError: hello failed: ", "pv-iommu")
    assert "pv_iommu_guest: XenError: hello failed" in text  # the program's own one-line error


def test_a_guest_that_never_starts_is_reported(tmp_path: Path) -> None:
    needs_compose()
    verdict = service("grants", "verdict-grants")
    files = [
        COMPOSE,
        override(
            tmp_path,
            {
                "backend": {"entrypoint": ["python", "-c", "import time; time.sleep(120)"], "command": []},
                "verdict-grants": {"command": [*verdict["command"], "--start-timeout", "3"]},
            },
        ),
    ]
    status, text, elapsed = run("grants", files, tmp_path)
    assert_failed(status, text, elapsed, "backend: never started (no backend.lock lease after 3 s)", "grants")


def test_a_verdict_without_a_daemon_fails_at_once(tmp_path: Path) -> None:
    proc = verdict(tmp_path, "--expect", "guest")
    out, err = proc.communicate(timeout=PROMPT)  # the verdict's own --timeout is 300 s
    assert proc.returncode == 1, out + err
    assert "VERDICT: FAIL: the daemon at " in out and "does not answer" in out, out
    assert "audit: not run" in out and "Traceback" not in out + err


def verdict(directory: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, str(ROOT / "clients" / "verdict.py"), "--dir", str(directory), "--scenario", "x", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_verdict_told_to_stop_says_fail_and_what_it_waited_for(tmp_path: Path) -> None:
    """``docker compose`` stopping the stack (SIGTERM) before the results came: still a verdict."""
    daemon = DaemonProcess(tmp_path / "d")
    try:
        proc = verdict(daemon.directory, "--expect", "guest")
        with SyncControlClient.connect(daemon.control_path) as ctl:
            deadline = time.monotonic() + PROMPT  # until the verdict holds its control connection
            while len(ctl.connections()["connections"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=PROMPT)
        assert proc.returncode == 1, out + err
        assert "VERDICT: FAIL: stopped by SIGTERM while waiting for guest (x)" in out, out
        assert "audit: clean" in out and "Traceback" not in out + err
    finally:
        daemon.stop()


def test_a_result_that_says_not_ok_is_the_reason(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d")
    try:
        results = daemon.directory / "results"
        results.mkdir()
        (results / "front.json").write_text(
            json.dumps({"ok": False, "errors": ["request 3: the backend read other data"]})
        )
        (results / "back.json").write_text(json.dumps({"ok": True}))
        out, err = verdict(daemon.directory, "--expect", "back", "--expect", "front").communicate(timeout=PROMPT)
        assert "VERDICT: FAIL: front: request 3: the backend read other data (x)" in out, out + err
        (results / "front.json").write_text(json.dumps({"ok": True}))
        proc = verdict(daemon.directory, "--expect", "back", "--expect", "front")
        out, err = proc.communicate(timeout=PROMPT)
        assert proc.returncode == 0 and "VERDICT: PASS (x)" in out, out + err
    finally:
        daemon.stop()


def test_a_migration_the_receiver_refuses_fails_with_the_clis_reason(tmp_path: Path) -> None:
    """The migrator aims at a directory with no daemon: its `xenemu migrate` fails in one line,
    the guest runs on at the source (it would wait for a move that never comes), and the
    verdict fails at once with the CLI's reason, both audits run."""
    needs_compose()
    migrator = service("migration", "migrator")
    command = list(migrator["command"])
    command[command.index("--to") + 1] = str(tmp_path / "nowhere")
    files = [COMPOSE, override(tmp_path, {"migrator": {"command": command}})]
    status, text, elapsed = run("migration", files, tmp_path)
    assert_failed(status, text, elapsed, "migration: xenemu: no xenemu daemon at ", "migration")
    assert "audit: clean (source and receiver)" in text
