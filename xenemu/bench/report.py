"""How a run is shown: the table a person reads, and the side-by-side with another revision
(run now, in a worktree of this checkout, so both figures come from the same machine state)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _memory(results: dict[str, Any]) -> list[str]:
    return [f"memory: {results['bytes_per_untouched_guest_frame']} B per untouched guest frame"]


def _throughput(results: dict[str, Any]) -> list[str]:
    lines = [
        "map+unmap throughput (full semantics vs echo of the same frames):",
        f"  {'batch':>6} {'ops/s':>10} {'echo ops/s':>11} {'ratio':>6} {'flush a/call':>12} {'flush m/call':>12}",
    ]
    for row in results["throughput"]:
        lines.append(
            f"  {row['batch']:>6} {row['ops_per_s']:>10} {row['echo_ops_per_s']:>11} {row['ratio']:>6} "
            f"{row['flushes_added_per_call']:>12} {row['flushes_modified_per_call']:>12}"
        )
    lat = results["latency_us"]
    lines.append(
        f"single-op latency: p50 {lat['p50']} us, p99 {lat['p99']} us; echo p50 {lat['echo_p50']} us, "
        f"p99 {lat['echo_p99']} us; p50 ratio {lat['p50_ratio']}"
    )
    return lines


def _scaling(results: dict[str, Any]) -> list[str]:
    return [
        "scaling (batch 256): "
        + ", ".join(f"{r['live_mappings']:,} live: {r['ops_per_s']} ops/s" for r in results["scaling"]),
        f"memory: {results['bytes_per_live_mapping']} B per live mapping",
    ]


def _m2b(results: dict[str, Any]) -> list[str]:
    return [
        "M2B: "
        + "; ".join(
            f"{r['entries_on_frame']:,} entries on the frame: lookup {r['lookup_ops_per_s']}"
            f"/s, unmap+map {r['unmap_map_pairs_per_s']}/s"
            for r in results["m2b"]
        )
    ]


def _fairness(results: dict[str, Any]) -> list[str]:
    fair = results["fairness_us"]
    return [
        f"fairness: victim p99 {fair['alone_p99']} us alone, {fair['flood_p99']} us while another domain "
        f"streams 65,536-op batches (p50 {fair['alone_p50']} / {fair['flood_p50']})"
    ]


def _hostile(results: dict[str, Any]) -> list[str]:
    hostile = results.get("hostile_us")
    if not hostile:
        return []
    return [
        f"hostile: victim p99 {hostile['alone_p99']} us alone; while another domain sends "
        + ", ".join(f"{k} batches {hostile[k]['p99']} us" for k in ("invalid", "failing", "sparse"))
        + (f", a 64K-page guest made and destroyed {hostile['lifecycle']['p99']} us" if "lifecycle" in hostile else "")
        + f"; sparse mappings cost at most {hostile['sparse_bytes_per_mapping_peak']} B each (leaf quota)"
    ]


def _balloon(results: dict[str, Any]) -> list[str]:
    bal = results["balloon_frames_per_s"]
    return [
        f"balloon-out of emulator-mapped frames: {bal['invalidate']}/s with invalidates, "
        f"{bal['swap_mfn']}/s with swap_mfn"
    ]


def _vits(results: dict[str, Any]) -> list[str]:
    vits = results["vits"]
    lat = vits["victim_ms"]
    lines = [
        f"vITS: {vits['guest_commands_per_s']} guest commands/s end to end; {vits['msis_per_s']} MSIs/s "
        "from device DMA to the guest's event",
        f"vITS victim command latency: alone p50 {lat['alone_p50']} ms, p99 {lat['alone_p99']} ms "
        f"({lat['passes_per_call_alone']} passes/call); while another guest floods p50 {lat['flood_p50']} ms, "
        f"p99 {lat['flood_p99']} ms ({lat['passes_per_call_flood']} passes/call)",
        "physical commands per guest command:",
        f"  {'policy':<7} {'bring-up':>9} {'enable-all-invall':>18} {'toggle-storm':>13}",
    ]
    for policy, row in vits["physical_per_guest_command"].items():
        lines.append(f"  {policy:<7} {row['bring-up']:>9} {row['enable-all-invall']:>18} {row['toggle-storm']:>13}")
    return lines


def _migration(results: dict[str, Any]) -> list[str]:
    mig = results.get("migration")
    if not mig:
        return []
    return [
        f"save/restore of a {mig['guest_mib']} MiB guest, every page written (image {mig['image_mib']} MiB, "
        f"two daemons): save {mig['save_s_per_gib']} s/GiB, restore {mig['restore_s_per_gib']} s/GiB"
    ]


def _live_migration(results: dict[str, Any]) -> list[str]:
    live = results.get("live_migration")
    if not live:
        return []
    from rich import box
    from rich.console import Console
    from rich.table import Table

    targets = live["targets"]
    table = Table(
        title=f"live migration of a {live['guest_mib']} MiB guest ({live['pages']:,} pages), two daemons",
        title_justify="left",
        box=box.SIMPLE,
    )
    for column in ("dirty MiB/s", "reached", "rounds", "pages sent", "x guest", "last section", "downtime ms"):
        table.add_column(column, justify="right")
    table.add_column("stop pause ms", justify="right")
    table.add_column("other pause ms", justify="right")
    for row in live["rates"]:
        pause, other = row["guest_pause_ms"], row.get("guest_other_pause_ms")
        table.add_row(
            f"{row['rate_mib_s']:g}",
            f"{row['achieved_mib_s']:g}",
            str(row["rounds"]),
            f"{row['pages_sent']:,}",
            f"{row['sent_ratio']:.3f}",
            f"{row['final_pages']:,}",
            f"{row['downtime_ms']:.1f}",
            "-" if pause is None else f"{pause:.1f}",
            "-" if other is None else f"{other:.1f}",
        )
    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None).print(table)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines() if line.strip()]
    at = next((r for r in live["rates"] if r["rate_mib_s"] == targets["rate_mib_s"]), None)
    if at is None:
        return [*lines, f"targets (at {targets['rate_mib_s']:g} MiB/s): not measured in this run"]
    verdict = {True: "met", False: "MISSED"}
    lines.append(
        f"targets at {targets['rate_mib_s']:g} MiB/s: downtime {at['downtime_ms']:.1f} ms (target <= "
        f"{targets['downtime_ms']:g} ms, {verdict[targets['downtime_met']]}), pages sent {at['sent_ratio']:.2f}x "
        f"the guest's (target <= {targets['sent_ratio']:g}x, {verdict[targets['sent_ratio_met']]}); "
        f"audit {'clean' if live['audit_clean'] else 'VIOLATIONS'} on both daemons"
    )
    return lines


#: Each section's lines, by the name ``run_bench`` reports it under, in the order it runs them.
SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "memory": _memory,
    "vits": _vits,
    "migration": _migration,
    "live_migration": _live_migration,
    "fast_path": lambda r: [f"compiled fast path: {'on' if r.get('fast_path') else 'off'}"],
    "scaling": _scaling,
    "throughput": _throughput,
    "m2b": _m2b,
    "fairness": _fairness,
    "hostile": _hostile,
    "balloon": _balloon,
    "audit": lambda r: [f"audit after the run: {'clean' if r['audit_clean'] else 'VIOLATIONS'}"],
}


def section_lines(name: str, results: dict[str, Any]) -> str:
    """What a person reads of one finished section."""
    return "\n".join(SECTIONS[name](results))


def table(results: dict[str, Any]) -> str:
    """Every section's lines, as a run printed them."""
    return "\n".join(line for name in SECTIONS for line in SECTIONS[name](results))


def flatten(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every figure as (dotted name, value): ``throughput[2].ops_per_s``, ``vits.msis_per_s``."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{prefix}[{i}]", item)
        else:
            out.append((prefix, value))

    walk("", results)
    return out


def write_csv(results: dict[str, Any], path: Path) -> None:
    """``figure,value`` rows, one per figure, for spreadsheets and plots."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["figure", "value"])
        writer.writerows(flatten(results))


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    """A run written by ``--out``; ``ValueError`` if it is not one."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a bench result file ({exc})") from None
    if not isinstance(loaded, dict) or "throughput" not in loaded:
        raise ValueError(f"{path}: not a bench result file (no throughput figures)")
    return loaded


def check_revision(rev: str) -> str:
    """The commit ``rev`` names in this checkout; ``ValueError`` before any benchmark runs if none."""
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode or not run.stdout.strip():
        raise ValueError(f"{rev!r} is not a revision of {root} (nor a bench JSON file)")
    return run.stdout.strip()


#: Where revisions kept the fast path's build script (newest first).
FAST_BUILDS = ("xenemu.core.iommu.fast_build", "xenemu.core.fast_build")


def compare(rev: str, quick: bool) -> dict[str, Any]:
    """The same benchmark from another git revision, run now (in a worktree of this checkout)."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="xenemu-rev-") as tmp:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", tmp, rev], check=True, capture_output=True
        )
        try:
            env = dict(os.environ, PYTHONPATH=tmp)
            builds = [m for m in FAST_BUILDS if (Path(tmp) / (m.replace(".", "/") + ".py")).exists()]
            for module in builds[:1]:  # compile that revision's fast path, wherever it kept it
                subprocess.run(
                    [sys.executable, "-m", module],
                    cwd=tmp,
                    env=env,
                    check=True,
                    capture_output=True,
                )
            run = subprocess.run(
                [sys.executable, "-m", "xenemu", "bench", "--json", *(["--quick"] if quick else [])],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            if run.returncode:
                raise RuntimeError(f"bench at {rev} failed: {run.stderr[-2000:]}")
            other: dict[str, Any] = json.loads(run.stdout)
            return other
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", tmp], capture_output=True)


def side_by_side(now: dict[str, Any], then: dict[str, Any], rev: str) -> str:
    lines = [f"{'figure':<44} {'this tree':>14} {rev[:12]:>14}"]

    def walk(prefix: str, a: Any, b: Any) -> None:
        if isinstance(a, dict):
            for key in a:
                walk(f"{prefix}.{key}" if prefix else key, a[key], b.get(key) if isinstance(b, dict) else None)
        elif isinstance(a, list):
            for i, item in enumerate(a):
                other = b[i] if isinstance(b, list) and i < len(b) else None
                walk(f"{prefix}[{i}]", item, other)
        else:
            lines.append(f"{prefix:<44} {a!s:>14} {b!s:>14}")

    walk("", now, then)
    return "\n".join(lines)
