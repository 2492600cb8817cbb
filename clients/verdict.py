#!/usr/bin/env python3
"""The end of a scenario: wait for each program's result, run the audit, print the verdict.

Exit status 0 and ``VERDICT: PASS (SCENARIO)`` only if every expected result says ok and the
audit is clean; otherwise ``VERDICT: FAIL: REASON (SCENARIO)`` and status 1, as soon as the
first failure is known:

* a result that says not ok (its ``error`` or first ``errors`` are the reason);
* a program that ended without a result: its lease (``results/NAME.lock``, held for its life) was
  released, so it died, whatever killed it;
* a program that never started within ``--start-timeout``, or still has no result after
  ``--timeout``;
* a daemon that stopped answering, or SIGTERM/SIGINT before every result came in.

The programs may run in other containers: all the verdict needs is the shared directory.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any


class Stopped(Exception):
    """SIGTERM or SIGINT arrived (``docker compose`` stopping the stack, or a person)."""


#: Signals that came before ``main`` was ready to stop (while the imports below still ran).
_EARLY: list[str] = []


def _stop(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if not _ARMED:
        _EARLY.append(name)
        return
    raise Stopped(name)


_ARMED = False
# Installed before the slow imports, so a stack stopped at once still gets a verdict.
signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _stop)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import lease_holder, lease_path, lease_state, one_line  # noqa: E402

from xenemu.client import SyncControlClient  # noqa: E402

#: How often the daemon is asked whether it is still there while results are awaited.
DAEMON_PING_INTERVAL = 1.0
#: How long any one request to the daemon may take before it counts as not answering.
DAEMON_TIMEOUT = 30.0


def failure_reason(result: Any) -> str:
    """Why a result is not ok, in one bounded line."""
    if not isinstance(result, dict):
        return "its result is not a JSON object"
    errors = result.get("errors")
    if result.get("error"):
        text = str(result["error"])
    elif isinstance(errors, list) and errors:
        text = "; ".join(str(e) for e in errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
    else:
        text = "its result says not ok: " + json.dumps({k: v for k, v in list(result.items())[:8]})
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:299] + "…"


def read_result(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        return {"ok": False, "error": f"unreadable result: {one_line(exc)}"}


class Waiter:
    """The expected results, gathered until all are in or the first failure is known."""

    def __init__(self, directory: Path, expect: list[str], start_timeout: float, timeout: float) -> None:
        self.control = directory / "control.sock"
        self.paths = {name: directory / "results" / f"{name}.json" for name in expect}
        self.results: dict[str, Any] = {}
        self.failures: list[str] = []
        now = time.monotonic()
        self.start_deadline, self.deadline = now + start_timeout, now + timeout
        self.start_timeout, self.timeout = start_timeout, timeout
        self.next_ping = now
        self.ctl: SyncControlClient | None = None

    def ping(self) -> str | None:
        """None while the daemon answers (on one control connection, kept); else why not."""
        try:
            if self.ctl is None:
                self.ctl = SyncControlClient.connect(self.control)
            self.ctl.stats()
        except Exception as exc:
            return f"the daemon at {self.control} does not answer ({one_line(exc)})"
        return None

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    def pending(self) -> list[str]:
        return [name for name in self.paths if name not in self.results]

    def check(self, name: str) -> None:
        path = self.paths[name]
        if path.exists():
            self.results[name] = read_result(path)
            if not (isinstance(self.results[name], dict) and self.results[name].get("ok")):
                self.failures.append(f"{name}: {failure_reason(self.results[name])}")
            return
        state = lease_state(path)
        if state == "released" and not path.exists():  # a result is written before the lease goes
            self.failures.append(f"{name}: died without a result ({lease_holder(path)})")
        elif state == "absent" and time.monotonic() > self.start_deadline:
            lease = lease_path(path).name
            self.failures.append(f"{name}: never started (no {lease} lease after {self.start_timeout:g} s)")

    def run(self) -> None:
        while self.pending() and not self.failures:
            for name in self.pending():
                self.check(name)
            now = time.monotonic()
            if self.failures or not self.pending():
                return
            if now > self.deadline:
                still = ", ".join(self.pending())
                self.failures.append(f"no result from {still} after {self.timeout:g} s")
                return
            if now >= self.next_ping:
                self.next_ping = now + DAEMON_PING_INTERVAL
                gone = self.ping()
                if gone:
                    self.failures.append(gone)
                    return
            time.sleep(0.05)


def audit(control: Path) -> tuple[list[str] | None, dict[str, Any], str | None]:
    """The audit's violations and the host's counters; None and the reason if the daemon is gone."""
    try:
        with SyncControlClient.connect(control) as ctl:
            return list(ctl.audit()), dict(ctl.stats()), None
    except Exception as exc:
        return None, {}, f"the audit could not run: the daemon at {control} does not answer ({one_line(exc)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--expect", action="append", default=[], help="a result name (DIR/results/NAME.json)")
    parser.add_argument("--start-timeout", type=float, default=60, help="seconds for each program to start")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for every result to come in")
    args = parser.parse_args(argv)
    if args.start_timeout <= 0 or args.timeout <= 0:
        parser.error("--start-timeout and --timeout must be positive")
    socket.setdefaulttimeout(DAEMON_TIMEOUT)  # a hung daemon is a failure, not a verdict that never comes
    global _ARMED
    waiter = Waiter(args.dir, args.expect, args.start_timeout, args.timeout)
    try:
        _ARMED = True
        if _EARLY:
            raise Stopped(_EARLY[0])
        waiter.run()
    except Stopped as exc:
        still = ", ".join(waiter.pending()) or "nothing"
        waiter.failures.append(f"stopped by {exc} while waiting for {still}")
    finally:
        waiter.close()
    # The verdict is decided: a stop now would only lose it (the audit's wait is bounded).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    violations, stats, gone = audit(args.dir / "control.sock")
    if gone:
        waiter.failures.append(gone)
    elif violations:
        waiter.failures.append(f"audit: {len(violations)} violations, first: {violations[0][:200]}")
    summary = {
        "scenario": args.scenario,
        "results": waiter.results,
        "missing": waiter.pending(),
        "audit": violations,
        "m2b_entries": stats.get("m2b_entries"),
        "free_frames": stats.get("free_frames"),
    }
    print(json.dumps(summary))
    state = "not run" if violations is None else f"{len(violations)} violations" if violations else "clean"
    print(f"audit: {state}")
    if waiter.failures:
        print(f"VERDICT: FAIL: {'; '.join(waiter.failures)} ({args.scenario})", flush=True)
        return 1
    print(f"VERDICT: PASS ({args.scenario})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
