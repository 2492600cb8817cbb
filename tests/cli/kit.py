"""A daemon for CLI tests, and the CLI run in-process (``xl``) or as a program (``xenemu``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conformance.beds import DaemonProcess
from xenemu.cli import main


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(
        tmp_path / "d", "--frames", "16384", "--dom0-memory", "512", "--fault-injection", "--its-cpus", "4"
    )
    yield proc
    proc.stop()


def xl(daemon: DaemonProcess | Path, *args: str) -> Run:
    """The CLI in this process (stdout is not a terminal: plain columns)."""
    directory = daemon if isinstance(daemon, Path) else daemon.directory
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["--dir", str(directory), *args])
    return Run(result.exit_code, result.stdout, result.stderr)


def xenemu(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Run:
    """``python -m xenemu ARGS`` as a user runs it, stdout piped."""
    run = subprocess.run(
        [sys.executable, "-m", "xenemu", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, **(env or {})),
    )
    return Run(run.returncode, run.stdout, run.stderr)
