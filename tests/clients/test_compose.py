"""docker-compose.yml and the Dockerfile: validated by the real tools, scenarios run locally."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients"))

import compose_local  # noqa: E402

PROFILES = ["pv-iommu", "mediated", "grants", "shared-its", "migration"]


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed")
    return found


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_file_is_valid(profile: str) -> None:
    run = subprocess.run(
        [tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "--profile", profile, "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_every_profile_has_a_verdict() -> None:
    for profile in PROFILES:
        services = compose_local.resolved_config(ROOT / "docker-compose.yml", profile)["services"]
        assert f"verdict-{profile}" in services and "hypervisor" in services


def test_dockerfile_lints_clean() -> None:
    run = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_scenario_runs_locally_from_the_compose_file(profile: str, tmp_path: Path) -> None:
    tool("docker-compose")
    status, output = compose_local.run(profile, ROOT / "docker-compose.yml", tmp_path, timeout=300)
    text = "\n".join(output)
    assert status == 0, text
    assert f"VERDICT: PASS ({profile})" in text and "audit: clean" in text
    # As `up --exit-code-from verdict-PROFILE`: the verdict's exit, and nothing before it, ended the run.
    assert text.index(f"verdict-{profile} exited with code 0\nAborting on container exit...") > text.index("VERDICT")
    assert text.count("Aborting on container exit...") == 1


def test_every_one_shot_service_is_unattached_so_only_the_verdict_ends_a_run() -> None:
    """`--exit-code-from` implies `--abort-on-container-exit`: any watched service's exit ends `up`."""
    for profile in PROFILES:
        services = compose_local.resolved_config(ROOT / "docker-compose.yml", profile)["services"]
        watched = {name for name, spec in services.items() if spec.get("attach") is not False}
        daemons = {name for name, spec in services.items() if "serve" in (spec.get("entrypoint") or [])}
        assert "hypervisor" in daemons and watched == daemons | {f"verdict-{profile}"}, profile


def test_an_attached_one_shot_toolstack_would_stop_the_stack_before_the_verdict(tmp_path: Path) -> None:
    """The mistake the README's command once made, caught as Compose would make it."""
    tool("docker-compose")
    mistake = tmp_path / "attached.json"
    mistake.write_text(json.dumps({"services": {"toolstack-grants": {"attach": True}}}))
    status, output = compose_local.run("grants", [ROOT / "docker-compose.yml", mistake], tmp_path, timeout=300)
    text = "\n".join(output)
    assert "toolstack-grants exited with code 0\nAborting on container exit..." in text
    # Compose's status is then the toolstack's 0 with no verdict at all: a false success.
    assert status == 0 and "VERDICT" not in text, text
