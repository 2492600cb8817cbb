"""The wheel on its own: built from the tree, installed into a fresh venv outside the repository,
and ``xenemu demo`` run from a directory that is not the checkout.

The venv has no system site-packages and nothing of the repository on its path, so any file the
demo needs that the wheel does not carry (the guest program, the ABI headers, the compiled fast
path) fails the test. Dependencies come from the package index as ``pip`` is configured (its
cache makes this quick after the first run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT)))
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        cwd=out,
        timeout=600,
    )
    (built,) = out.glob("xenemu-*.whl")
    return built


def test_the_wheel_carries_what_an_install_needs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "xenemu/py.typed",
        "xenemu/_clients/pv_iommu_guest.py",
        "xenemu/_clients/exchange.py",
        "xenemu/_abi/pv_iommu.h",
        "xenemu/_abi/gic_its.h",
    ):
        assert needed in names, needed
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Typing :: Typed" in metadata and "Classifier: Topic :: System :: Emulators" in metadata
    assert "Project-URL: " in metadata
    assert not any(n.startswith(("tests/", "clients/")) for n in names)


def test_the_wheel_alone_runs_the_demo(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import json, xenemu, xenemu.client; print(json.dumps([xenemu.__file__, str(xenemu.programs_dir())]))",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=elsewhere,
        check=True,
    )
    module, programs = json.loads(where.stdout)
    assert module.startswith(str(env_dir)) and programs.startswith(str(env_dir)), (module, programs)
    assert (Path(module).parent / "py.typed").is_file()
    demo = subprocess.run(
        [str(env_dir / "bin" / "xenemu"), "demo", "--memory", "256"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=elsewhere,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "audit clean" in demo.stdout
