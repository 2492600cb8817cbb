"""Fixtures: xenemu daemons, one per distinct set of host options, shared by the cases.

The conformance cases live in ``xenemu.conformance`` (``xenemu conformance`` runs them against
any implementation); these tests run every rule against xenemu's daemon started with the host
options the rule needs, with the compiled fast path on and off, and the rules written against
the ``Bed`` interface on the pure core too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.beds import DaemonProcess

#: Every bed uses the same machine, so frame numbers mean the same on each.
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


def daemon_flags(options: dict[str, Any]) -> list[str]:
    return [flag for key, value in sorted(options.items()) for flag in FLAGS[key](value)]


class Daemons:
    """One daemon per distinct set of host options, shared by the cases that use it."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, ...], DaemonProcess] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="xenemu-conformance-")

    def get(self, options: dict[str, Any]) -> DaemonProcess:
        flags = tuple(daemon_flags(options))
        if flags not in self.running:
            self.running[flags] = DaemonProcess(Path(tempfile.mkdtemp(dir=self.tmp.name)), *flags)
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
