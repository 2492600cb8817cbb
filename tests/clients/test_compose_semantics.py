"""compose_local applies ``docker compose up``'s rules, so a compose file that would go wrong
under Docker goes wrong here too (the rules as in docker/compose's up.go and monitor.go).

Each test writes a small compose file of ``python -c`` services: a long-running ``daemon``, a
one-shot ``job`` and the ``main`` service whose exit code is wanted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients"))

import compose_local  # noqa: E402
from compose_local import Policy  # noqa: E402


@pytest.fixture(autouse=True)
def needs_compose() -> None:
    try:
        compose_local.compose_binary()
    except compose_local.ComposeError:
        pytest.skip("docker-compose is not installed")


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def stack(tmp_path: Path, job_attach: bool = False, job_code: int = 0, main_code: int = 3, **extra: Any) -> Path:
    services: dict[str, Any] = {
        "daemon": {"command": py("import time; print('up', flush=True); time.sleep(60)")},
        "job": {"command": py(f"raise SystemExit({job_code})"), "attach": job_attach, "depends_on": ["daemon"]},
        "main": {
            "command": py(
                f"import time; time.sleep(0.3); print('main ran', flush=True); raise SystemExit({main_code})"
            ),
            "depends_on": {"job": {"condition": "service_completed_successfully"}},
        },
    }
    for name, change in extra.items():
        services[name].update(change)
    for spec in services.values():
        spec.update(image="python:3.11-slim", profiles=["t"])
    path = tmp_path / "compose.json"
    path.write_text(json.dumps({"services": services}))
    return path


def up(path: Path, tmp_path: Path, policy: Policy, timeout: float = 60) -> tuple[int, str]:
    status, output = compose_local.run("t", path, tmp_path, timeout, policy)
    return status, "\n".join(output)


def test_exit_code_from_implies_abort_on_exit_so_an_attached_one_shot_job_stops_the_stack(tmp_path: Path) -> None:
    """The README's mistake: the job exits 0 first, so main never runs and up returns 0."""
    status, text = up(stack(tmp_path, job_attach=True), tmp_path, Policy(exit_code_from="main"))
    assert "job exited with code 0\nAborting on container exit..." in text
    assert "main ran" not in text and status == 0


def test_a_job_that_is_not_attached_is_not_watched_and_main_decides(tmp_path: Path) -> None:
    status, text = up(stack(tmp_path), tmp_path, Policy(exit_code_from="main"))
    assert "main ran" in text and "main exited with code 3\nAborting on container exit..." in text
    assert "job exited" not in text  # not watched, not reported
    assert "daemon exited with code 143" in text  # stopped with SIGTERM: 128 + 15
    assert status == 3


def test_abort_on_failure_ignores_a_successful_exit_and_keeps_the_exit_code_from(tmp_path: Path) -> None:
    policy = Policy(exit_code_from="main", abort_on_failure=True)
    status, text = up(stack(tmp_path, job_attach=True), tmp_path, policy)
    assert "job exited with code 0" in text and "main ran" in text
    assert "main exited with code 3\nAborting on container exit..." in text and status == 3


def test_abort_on_failure_never_ends_while_a_daemon_runs_and_main_succeeded(tmp_path: Path) -> None:
    """Why the scenarios do not use --abort-on-container-failure: a PASS would wait for ever."""
    policy = Policy(exit_code_from="main", abort_on_failure=True)
    status, text = up(stack(tmp_path, main_code=0), tmp_path, policy, timeout=3)
    assert "main exited with code 0" in text and "Aborting" not in text
    assert "compose_local: timeout: t did not finish in 3 s (running: daemon)" in text and status == 1


def test_without_abort_up_ends_when_every_watched_service_has_exited(tmp_path: Path) -> None:
    daemon = {"command": py("print('up', flush=True)")}
    status, text = up(stack(tmp_path, daemon=daemon), tmp_path, Policy())
    assert "daemon exited with code 0" in text and "main exited with code 3" in text
    assert "Aborting" not in text and status == 0  # no --exit-code-from: Compose's own status


def test_abort_on_exit_returns_the_first_exit_when_no_service_is_named(tmp_path: Path) -> None:
    daemon = {"command": py("raise SystemExit(7)")}
    status, text = up(stack(tmp_path, daemon=daemon), tmp_path, Policy(abort_on_exit=True))
    assert "daemon exited with code 7\nAborting on container exit..." in text and status == 7


def test_a_failed_completed_successfully_dependency_is_composes_error(tmp_path: Path) -> None:
    status, text = up(stack(tmp_path, job_code=4), tmp_path, Policy(exit_code_from="main"))
    assert 'compose_local: service "job" didn\'t complete successfully: exit 4' in text
    assert "main ran" not in text and status == 1


def test_service_healthy_waits_for_the_healthcheck(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    daemon = {
        "command": py(f"import pathlib, time; time.sleep(1); pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"),
        "healthcheck": {
            "test": ["CMD", "python", "-c", f"import pathlib, sys; sys.exit(not pathlib.Path({str(flag)!r}).exists())"],
            "interval": "30s",
            "start_period": "20s",
            "start_interval": "200ms",
        },
    }
    job = {
        "depends_on": {"daemon": {"condition": "service_healthy"}},
        "command": py(f"import pathlib, sys; sys.exit(not pathlib.Path({str(flag)!r}).exists())"),
    }
    status, text = up(stack(tmp_path, daemon=daemon, job=job), tmp_path, Policy(exit_code_from="main"))
    assert "main ran" in text and status == 3  # the job found the flag: it started after healthy


def test_an_unhealthy_dependency_is_composes_error(tmp_path: Path) -> None:
    daemon = {
        "healthcheck": {"test": ["CMD", "python", "-c", "raise SystemExit(1)"], "interval": "100ms", "retries": 2},
    }
    job = {"depends_on": {"daemon": {"condition": "service_healthy"}}}
    status, text = up(stack(tmp_path, daemon=daemon, job=job), tmp_path, Policy(exit_code_from="main"))
    assert "compose_local: dependency failed to start: container daemon is unhealthy" in text and status == 1


def test_the_flags_are_checked_as_compose_checks_them() -> None:
    with pytest.raises(compose_local.ComposeError, match="cannot be combined"):
        Policy(abort_on_exit=True, abort_on_failure=True)
    assert Policy(exit_code_from="x").abort_on_exit
    assert not Policy(exit_code_from="x", abort_on_failure=True).abort_on_exit


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(ROOT / "clients" / "compose_local.py"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--profile", "grants", "--timeout", "0.5"], 1, "compose_local: timeout: grants did not finish in 0.5 s"),
        (["--profile", "nope"], 1, "compose_local: profile 'nope' has no services (profiles: grants mediated"),
        (["--profile", "grants", "--exit-code-from", "nosuch"], 1, "compose_local: no such service: nosuch"),
        (["--profile", "grants", "--file", "/nonexistent.yml"], 1, "compose_local: /nonexistent.yml: no such"),
        (["--profile", "grants", "--timeout", "0"], 2, "--timeout must be positive"),
        (
            ["--profile", "grants", "--abort-on-container-exit", "--abort-on-container-failure"],
            1,
            "compose_local: --abort-on-container-failure cannot be combined with --abort-on-container-exit",
        ),
    ],
)
def test_compose_local_prints_its_own_errors(args: list[str], status: int, message: str) -> None:
    out = cli(*args)
    assert out.returncode == status and message in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_broken_compose_file_is_one_line_from_the_compose_tool(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  x:\n    image: y\n    depends_on: [nothere]\n    profiles: [t]\n")
    out = cli("--profile", "t", "--file", str(bad))
    assert out.returncode == 1 and out.stderr.startswith("compose_local: docker-compose config: "), out.stderr
    assert "nothere" in out.stderr and len(out.stderr.strip().splitlines()) == 1
