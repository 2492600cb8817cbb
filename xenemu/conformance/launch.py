"""``xenemu serve`` as a subprocess on sockets in a directory: the self-test's mutants and the
test suite's daemons are started the same way, as any user would start one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class DaemonProcess:
    """A daemon started with ``python -m xenemu --dir DIR serve FLAGS``; ``env`` adds to the
    environment (the self-test names its mutant there)."""

    def __init__(self, directory: Path, *flags: str, env: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.control_path = directory / "control.sock"
        self.hypercall_path = directory / "hypercall.sock"
        directory.mkdir(parents=True, exist_ok=True)
        self.log = open(directory / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xenemu", "--dir", str(directory), "serve", "--log-level", "warning", *flags],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
        )
        deadline = time.monotonic() + 30
        while not (self.hypercall_path.exists() and self.control_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start: {(directory / 'daemon.log').read_text()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return (self.directory / "daemon.log").read_text()
