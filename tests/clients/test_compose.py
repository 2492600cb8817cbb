"""docker-compose.yml and the Dockerfile: validated by the real tools, scenarios run locally."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients"))

import compose_local  # noqa: E402

PROFILES = ["pv-iommu", "mediated", "grants", "shared-its"]


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
