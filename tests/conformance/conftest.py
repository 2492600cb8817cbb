"""Fixtures: each case runs on the pure core and on a real daemon over its sockets.

To check another implementation of PROTOCOL.md, point the suite at it:

    XENEMU_CONFORMANCE_CONTROL=/path/control.sock XENEMU_CONFORMANCE_HYPERCALL=/path/hypercall.sock \\
        pytest tests/conformance -k wire

Cases that need host options the external daemon was not started with are skipped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.beds import CoreBed, DaemonProcess, WireBed

#: Both beds use the same machine so frame numbers mean the same on each.
BASE = {"nr_frames": 8192, "dom0_memory": 512, "fault_injection": True}
FLAGS = {
    "iommu": lambda v: [] if v else ["--no-iommu"],
    "dom0_strict": lambda v: ["--dom0-strict"] if v else [],
    "dom0_passthrough": lambda v: ["--dom0-passthrough"] if v else [],
    "max_order": lambda v: ["--max-order", str(v)],
    "nr_frames": lambda v: ["--frames", str(v)],
    "dom0_memory": lambda v: ["--dom0-memory", str(v)],
    "dom0_kind": lambda v: ["--dom0-type", v],
    "max_ops_per_call": lambda v: ["--max-ops", str(v)],
    "continuation_every": lambda v: ["--continuation-every", str(v)],
    "fault_injection": lambda v: ["--fault-injection"] if v else [],
    "fast_path": lambda v: [] if v else ["--no-fast-path"],
}
EXTERNAL = os.environ.get("XENEMU_CONFORMANCE_CONTROL"), os.environ.get("XENEMU_CONFORMANCE_HYPERCALL")


def daemon_flags(options: dict[str, Any]) -> list[str]:
    return [flag for key, value in sorted(options.items()) for flag in FLAGS[key](value)]


class Daemons:
    """One daemon per distinct set of host options, shared by the cases that use it."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, ...], DaemonProcess] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="xenemu-conformance-")

    def get(self, options: dict[str, Any], fresh: bool = False) -> DaemonProcess:
        flags = tuple(daemon_flags(options))
        if fresh or flags not in self.running:
            directory = Path(tempfile.mkdtemp(dir=self.tmp.name))
            daemon = DaemonProcess(directory, *flags)
            if fresh:
                return daemon
            self.running[flags] = daemon
        return self.running[flags]

    def stop(self) -> None:
        for daemon in self.running.values():
            daemon.stop()
        self.tmp.cleanup()


@pytest.fixture(scope="session")
def daemons() -> Iterator[Daemons]:
    pool = Daemons()
    yield pool
    pool.stop()


def host_marker(request: pytest.FixtureRequest) -> tuple[dict[str, Any], bool]:
    marker = request.node.get_closest_marker("host")
    options = dict(BASE)
    fresh = False
    if marker is not None:
        extra = dict(marker.kwargs)
        fresh = bool(extra.pop("fresh", False))
        options.update(extra)
    return options, fresh


@pytest.fixture(params=["core", "core-python", "wire", "wire-python"])
def cbed(request: pytest.FixtureRequest, daemons: Daemons) -> Iterator[CoreBed | WireBed]:
    """The bed a conformance case runs on; audit must be clean when the case ends. The
    ``-python`` beds turn xenemu's compiled fast path off: both must give the same results."""
    options, fresh = host_marker(request)
    kind, _, python = str(request.param).partition("-")
    if python:
        if all(EXTERNAL):
            pytest.skip("the fast path is xenemu's own; an external daemon runs once")
        options["fast_path"] = False
    bed: CoreBed | WireBed
    daemon = None
    if kind == "core":
        bed = CoreBed(**options)
    elif all(EXTERNAL):
        bed = WireBed(Path(EXTERNAL[0] or ""), Path(EXTERNAL[1] or ""))
        have = bed.control.host_info()["options"]
        if (
            any(have.get(k) != v for k, v in options.items() if k not in ("nr_frames", "dom0_memory", "fast_path"))
            or fresh
        ):
            bed.close()
            pytest.skip("the external daemon runs with other host options")
    else:
        daemon = daemons.get(options, fresh)
        bed = WireBed(daemon.control_path, daemon.hypercall_path)
    try:
        yield bed
        problems = bed.audit()
        assert not problems, "\n".join(problems)
    finally:
        bed.close()
        if daemon is not None and fresh:
            daemon.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "host(**options): host options for a conformance case; fresh=True for its own daemon"
    )
