"""``xenemu bench --plot FILE.png``: map+unmap throughput against batch size (xenemu and the echo
baseline, log-log), and physical commands per guest command under each elision policy.

matplotlib is an optional extra (``pip install 'xenemu[plot]'``); without it ``PlotUnavailable``
says how to get it, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(results: dict[str, Any], path: Path) -> None:
    """Draw both charts side by side into ``path`` (any format matplotlib writes: png, svg, pdf)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'xenemu[plot]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = results["throughput"]
    batches = [r["batch"] for r in rows]
    left.plot(batches, [r["ops_per_s"] for r in rows], marker="o", label="map+unmap (full semantics)")
    left.plot(batches, [r["echo_ops_per_s"] for r in rows], marker="s", linestyle="--", label="echo baseline")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("ops per batch")
    left.set_ylabel("ops/s")
    left.set_title("PV IOMMU throughput against batch size")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    table = results["vits"]["physical_per_guest_command"]
    policies = list(table)
    patterns = list(next(iter(table.values())))
    width = 0.8 / max(len(policies), 1)
    for i, policy in enumerate(policies):
        xs = [j + i * width for j in range(len(patterns))]
        right.bar(xs, [table[policy][p] for p in patterns], width, label=policy)
    right.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(patterns))], patterns)
    right.set_ylabel("physical commands per guest command")
    right.set_title("vITS elision")
    right.legend(title="policy")
    machine = results.get("machine", {})
    fig.suptitle(f"xenemu bench ({machine.get('cpus', '?')} CPUs, Python {machine.get('python', '?')})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
