"""How a run is shown: the table a person reads, and the side-by-side with another revision
(run now, in a worktree of this checkout, so both figures come from the same machine state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def table(results: dict[str, Any]) -> str:
    lines = [
        f"compiled fast path: {'on' if results.get('fast_path') else 'off'}",
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
    lines.append(
        "scaling (batch 256): "
        + ", ".join(f"{r['live_mappings']:,} live: {r['ops_per_s']} ops/s" for r in results["scaling"])
    )
    lines.append(
        "M2B: "
        + "; ".join(
            f"{r['entries_on_frame']:,} entries on the frame: lookup {r['lookup_ops_per_s']}"
            f"/s, unmap+map {r['unmap_map_pairs_per_s']}/s"
            for r in results["m2b"]
        )
    )
    lines.append(
        f"memory: {results['bytes_per_live_mapping']} B per live mapping, "
        f"{results['bytes_per_untouched_guest_frame']} B per untouched guest frame"
    )
    fair = results["fairness_us"]
    lines.append(
        f"fairness: victim p99 {fair['alone_p99']} us alone, {fair['flood_p99']} us while another domain "
        f"streams 65,536-op batches (p50 {fair['alone_p50']} / {fair['flood_p50']})"
    )
    hostile = results.get("hostile_us")
    if hostile:
        lines.append(
            f"hostile: victim p99 {hostile['alone_p99']} us alone; while another domain sends "
            + ", ".join(f"{k} batches {hostile[k]['p99']} us" for k in ("invalid", "failing", "sparse"))
            + (
                f", a 64K-page guest made and destroyed {hostile['lifecycle']['p99']} us"
                if "lifecycle" in hostile
                else ""
            )
            + f"; sparse mappings cost at most {hostile['sparse_bytes_per_mapping_peak']} B each (leaf quota)"
        )
    bal = results["balloon_frames_per_s"]
    lines.append(
        f"balloon-out of emulator-mapped frames: {bal['invalidate']}/s with invalidates, "
        f"{bal['swap_mfn']}/s with swap_mfn"
    )
    lines.append(f"audit after the run: {'clean' if results['audit_clean'] else 'VIOLATIONS'}")
    vits = results["vits"]
    lat = vits["victim_ms"]
    lines.append(
        f"vITS: {vits['guest_commands_per_s']} guest commands/s end to end; {vits['msis_per_s']} MSIs/s "
        "from device DMA to the guest's event"
    )
    lines.append(
        f"vITS victim command latency: alone p50 {lat['alone_p50']} ms, p99 {lat['alone_p99']} ms "
        f"({lat['passes_per_call_alone']} passes/call); while another guest floods p50 {lat['flood_p50']} ms, "
        f"p99 {lat['flood_p99']} ms ({lat['passes_per_call_flood']} passes/call)"
    )
    mig = results.get("migration")
    if mig:
        lines.append(
            f"save/restore of a {mig['guest_mib']} MiB guest, every page written (image {mig['image_mib']} MiB, "
            f"two daemons): save {mig['save_s_per_gib']} s/GiB, restore {mig['restore_s_per_gib']} s/GiB"
        )
    lines.append("physical commands per guest command:")
    lines.append(f"  {'policy':<7} {'bring-up':>9} {'enable-all-invall':>18} {'toggle-storm':>13}")
    for policy, row in vits["physical_per_guest_command"].items():
        lines.append(f"  {policy:<7} {row['bring-up']:>9} {row['enable-all-invall']:>18} {row['toggle-storm']:>13}")
    return "\n".join(lines)


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
