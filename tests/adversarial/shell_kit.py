"""What the shell's adversarial tests share: a daemon to attack, raw sockets, its own words.

Every test drives a real ``xenemu serve`` over its sockets as an attacker would (a raw socket
that sends what no client library would, and reads only when it chooses to), then checks the
refusal, the bound (from the daemon's own accounting, the control request ``connections``)
and a clean audit. Timeouts are shortened with the daemon's flags; nothing asserts how long
something took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient
from xenemu.conformance.target import Raw
from xenemu.wire import encode

__all__ = ["Raw", "attacked", "connect", "connections", "log_events", "stall", "wait_for"]


@contextmanager
def attacked(tmp_path: Path, *flags: str) -> Iterator[DaemonProcess]:
    """A daemon logging JSON at warning level, stopped afterwards (it must exit 0)."""
    daemon = DaemonProcess(tmp_path / "run", "--log-json", *flags)
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()[-4000:]


def log_events(daemon: DaemonProcess, event: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [e for e in lines if event is None or e.get("event") == event]


def wait_for(what: Callable[[], Any], timeout: float = 30, message: str = "") -> Any:
    """Poll until ``what`` is truthy (a generous bound, for the daemon to act, not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, message or "the daemon never did it"
        time.sleep(0.02)


def connect(path: Path) -> Raw:
    """A raw connection, waiting while the daemon's listen backlog is full."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return Raw(path)
        except BlockingIOError:
            assert time.monotonic() < deadline, "the daemon stopped accepting"
            time.sleep(0.01)


def connections(ctl: SyncControlClient) -> dict[str, Any]:
    """The daemon's accounting of its connections, without the asking one (the last peer)."""
    reply: dict[str, Any] = ctl.connections()
    return reply


def stall(raw: Raw, message: dict[str, Any], limit: int = 4096) -> int:
    """Send ``message`` again and again without reading anything, until the daemon stops
    taking them (both socket buffers are full, so the daemon is blocked sending to us).
    Returns how many were sent."""
    frame = encode(message)
    raw.sock.settimeout(0.5)
    sent = 0
    try:
        while sent < limit:
            raw.sock.sendall(frame)
            sent += 1
    except (TimeoutError, BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass  # full buffers, or (on a loaded machine) already cut for not reading: both are the point
    raw.sock.settimeout(20)
    return sent
