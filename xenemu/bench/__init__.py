"""``xenemu bench``: the figures that say whether xenemu keeps up, each against a baseline
measured in the same run on the same socket (an ``echo`` of the same frames), because these
machines are noisy. It starts its own daemons as subprocesses and talks to them as guests do.

- ``harness``: the daemon, guests, timers and percentiles every section uses.
- ``iommu``: the PV IOMMU sections (throughput, scaling, M2B, memory, fairness, ballooning).
- ``hostile``: a victim's latency under each kind of hostile batch, and sparse mappings' cost.
- ``vits``: the vITS section and the elision table.
- ``migration``: save and restore time per GiB of guest memory, over two daemons.
- ``report``: the table, and ``--compare REV``'s side-by-side.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from xenemu.bench.harness import Daemon, Scale
from xenemu.bench.hostile import hostile_section
from xenemu.bench.iommu import (
    balloon_section,
    fairness_section,
    m2b_section,
    memory_section,
    scaling_section,
    throughput_section,
)
from xenemu.bench.migration import migration_section
from xenemu.bench.report import compare, side_by_side, table
from xenemu.bench.vits import VitsGuest, vits_section
from xenemu.client import SyncControlClient

__all__ = ["Scale", "VitsGuest", "compare", "run_bench", "side_by_side", "table"]


def run_bench(scale: Scale) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="xenemu-bench-") as tmp:
        # Each memory figure on a daemon of its own, so no freed memory is reused and hidden.
        results.update(memory_section(Path(tmp) / "memory", scale))
        results.update(vits_section(Path(tmp) / "vits", scale))
        results.update(migration_section(Path(tmp) / "migration", scale))
        daemon = Daemon(Path(tmp) / "main", 1_200_000)
        try:
            with SyncControlClient.connect(daemon.control) as ctl:
                results["fast_path"] = ctl.host_info().get("fast_path", False)
                results.update(scaling_section(ctl, daemon, scale))
                results.update(throughput_section(ctl, daemon, scale))
                results.update(m2b_section(ctl, daemon, scale))
                results.update(fairness_section(ctl, daemon, scale))
                results.update(hostile_section(ctl, daemon, scale))
                results.update(balloon_section(ctl, daemon, scale))
                results["audit_clean"] = ctl.audit() == []
        finally:
            daemon.stop()
    return results
