"""``xenemu bench``: the figures that say whether xenemu keeps up, each against a baseline
measured in the same run on the same socket (an ``echo`` of the same frames), because these
machines are noisy. It starts its own daemons as subprocesses and talks to them as guests do.

- ``harness``: the daemon, guests, timers and percentiles every section uses.
- ``iommu``: the PV IOMMU sections (throughput, scaling, M2B, memory, fairness, ballooning).
- ``hostile``: a victim's latency under each kind of hostile batch, and sparse mappings' cost.
- ``vits``: the vITS section and the elision table.
- ``migration``: save and restore time per GiB of guest memory, over two daemons, and a live
  migration's downtime and pages sent against the guest's dirty rate.
- ``report``: each section's lines as it finishes, the CSV and JSON files, and ``--compare``'s
  side-by-side (another revision run now, or a file an earlier run wrote).
- ``plot``: ``--plot``'s charts (throughput against batch size, the elision table, and the live
  migration's downtime and pages sent against the dirty rate), with matplotlib, an optional
  extra (``pip install 'xenemu[plot]'``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
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
from xenemu.bench.migration import live_migration_section, migration_section
from xenemu.bench.report import compare, section_lines, side_by_side, table
from xenemu.bench.vits import VitsGuest, vits_section
from xenemu.client import SyncControlClient

__all__ = ["Scale", "VitsGuest", "compare", "run_bench", "section_lines", "side_by_side", "table"]

#: Told each section's name and the results so far as soon as that section is done.
Progress = Callable[[str, dict[str, Any]], None]


def run_bench(scale: Scale, progress: Progress | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}

    def done(name: str, figures: dict[str, Any]) -> None:
        results.update(figures)
        if progress is not None:
            progress(name, results)

    with tempfile.TemporaryDirectory(prefix="xenemu-bench-") as tmp:
        # Each memory figure on a daemon of its own, so no freed memory is reused and hidden.
        done("memory", memory_section(Path(tmp) / "memory", scale))
        done("vits", vits_section(Path(tmp) / "vits", scale))
        done("migration", migration_section(Path(tmp) / "migration", scale))
        done("live_migration", live_migration_section(Path(tmp) / "live", scale))
        daemon = Daemon(Path(tmp) / "main", 1_200_000)
        try:
            with SyncControlClient.connect(daemon.control) as ctl:
                done("fast_path", {"fast_path": ctl.host_info().get("fast_path", False)})
                done("scaling", scaling_section(ctl, daemon, scale))
                done("throughput", throughput_section(ctl, daemon, scale))
                done("m2b", m2b_section(ctl, daemon, scale))
                done("fairness", fairness_section(ctl, daemon, scale))
                done("hostile", hostile_section(ctl, daemon, scale))
                done("balloon", balloon_section(ctl, daemon, scale))
                done("audit", {"audit_clean": ctl.audit() == []})
        finally:
            daemon.stop()
    return results
