"""``xenemu bench --plot FILE.png``: map+unmap throughput against batch size (xenemu and the echo
baseline, log-log), physical commands per guest command under each elision policy, and (for a
run that has them) a live migration's downtime and pages sent against the guest's dirty rate,
with the issue's targets drawn in.

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
    live = results.get("live_migration")
    if live:
        fig, grid = plt.subplots(2, 2, figsize=(12, 9))
        (left, right), (down, sent) = grid
        _live(live, down, sent)
    else:
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


def _live(live: dict[str, Any], down: Any, sent: Any) -> None:
    """Downtime and pages sent (as a multiple of the guest's) against the rate the writer
    reached during each migration, each with its target at the target rate."""
    rows = live["rates"]
    rates = [r["achieved_mib_s"] for r in rows]
    targets = live["targets"]
    down.plot(rates, [r["downtime_ms"] for r in rows], marker="o", label="downtime (stop-and-copy)")
    pauses = [(r["achieved_mib_s"], r["guest_pause_ms"]) for r in rows if r["guest_pause_ms"] is not None]
    if pauses:
        down.plot(*zip(*pauses, strict=True), marker="s", linestyle="--", label="the guest's pause across the stop")
    down.plot(
        [targets["rate_mib_s"]],
        [targets["downtime_ms"]],
        marker="*",
        markersize=14,
        linestyle="none",
        color="red",
        label=f"target: <= {targets['downtime_ms']:g} ms at {targets['rate_mib_s']:g} MiB/s",
    )
    down.axhline(targets["downtime_ms"], color="red", linestyle=":", linewidth=1)
    down.set_xlabel("guest dirty rate reached (MiB/s)")
    down.set_ylabel("ms")
    down.set_title(f"live migration of a {live['guest_mib']} MiB guest: downtime")
    down.grid(True, alpha=0.3)
    down.legend()
    sent.plot(rates, [r["sent_ratio"] for r in rows], marker="o", label="pages sent / guest pages")
    sent.plot(
        [targets["rate_mib_s"]],
        [targets["sent_ratio"]],
        marker="*",
        markersize=14,
        linestyle="none",
        color="red",
        label=f"target: <= {targets['sent_ratio']:g}x at {targets['rate_mib_s']:g} MiB/s",
    )
    sent.axhline(targets["sent_ratio"], color="red", linestyle=":", linewidth=1)
    sent.set_xlabel("guest dirty rate reached (MiB/s)")
    sent.set_ylabel("x guest memory")
    sent.set_title("live migration: pages sent")
    sent.grid(True, alpha=0.3)
    sent.legend()
