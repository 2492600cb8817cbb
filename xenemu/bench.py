"""``xenemu bench``: the figures that say whether xenemu keeps up, each against a baseline
measured in the same run on the same socket (an ``echo`` of the same frames), because these
machines are noisy. It starts its own daemon as a subprocess and talks to it as guests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenemu import ops
from xenemu.client import SyncControlClient, SyncHypercallClient

BATCHES = (1, 16, 256, 4096)


@dataclass
class Scale:
    """How much work each figure does; ``quick`` is for tests and smoke runs."""

    ops_per_batch_size: int = 65536
    latency_samples: int = 2000
    live: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    m2b_entries: int = 10_000
    untouched_frames: int = 4 * 1024 * 1024  # a 16 GiB guest
    fairness_samples: int = 300
    balloon_frames: int = 4096

    @classmethod
    def quick(cls) -> Scale:
        return cls(4096, 200, (1_000, 10_000, 50_000), 1_000, 65536, 50, 1024)


@dataclass
class Daemon:
    directory: Path
    frames: int
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xenemu",
                "--dir",
                str(self.directory),
                "serve",
                "--frames",
                str(self.frames),
                "--dom0-memory",
                "1024",
                "--log-level",
                "error",
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (self.directory / "hypercall.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's daemon did not start")
            time.sleep(0.02)

    @property
    def control(self) -> Path:
        return self.directory / "control.sock"

    @property
    def hypercall(self) -> Path:
        return self.directory / "hypercall.sock"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def guest(ctl: SyncControlClient, daemon: Daemon, memory: int, bdf: str, **kw: Any) -> tuple[int, SyncHypercallClient]:
    reply = ctl.create_domain("hvm", memory, **kw)
    if bdf:
        ctl.assign_device(reply["domid"], bdf)
    return reply["domid"], SyncHypercallClient.connect(daemon.hypercall, reply["token"])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def map_unmap_frames(batch: int, base: int, memory: int) -> tuple[bytes, bytes]:
    maps = ops.pack([ops.map_page(base + i, i % memory) for i in range(batch)])
    unmaps = ops.pack([ops.unmap_page(base + i) for i in range(batch)])
    return bytes(maps), bytes(unmaps)


def throughput(xc: SyncHypercallClient, batch: int, total: int, base: int, memory: int, echo: bool) -> float:
    """Ops per second of map+unmap batches (or their echo), ``total`` ops in all; the best of
    three runs, since a noisy machine only ever makes a run slower."""
    return max(_throughput(xc, batch, total, base, memory, echo) for _ in range(3))


def _throughput(xc: SyncHypercallClient, batch: int, total: int, base: int, memory: int, echo: bool) -> float:
    maps, unmaps = map_unmap_frames(batch, base, memory)
    rounds = max(total // (2 * batch), 1)

    def run() -> None:
        for _ in range(rounds):
            for buf in (maps, unmaps):
                if echo:
                    xc.echo(buf, batch)
                else:
                    ret, _ = xc.iommu_op_raw(buf, batch)
                    assert ret == 0

    return 2 * rounds * batch / timed(run)


def repeat(times: int, fn: Callable[..., object], *args: object) -> float:
    """Seconds for ``times`` calls of ``fn(*args)``."""
    start = time.perf_counter()
    for _ in range(times):
        fn(*args)
    return time.perf_counter() - start


def latencies(call: Callable[[], Any], samples: int) -> tuple[float, float]:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6


def run_bench(scale: Scale) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="xenemu-bench-") as tmp:
        # Each memory figure on a daemon of its own, so no freed memory is reused and hidden.
        results.update(memory_section(Path(tmp) / "memory", scale))
        daemon = Daemon(Path(tmp) / "main", 1_200_000)
        try:
            with SyncControlClient.connect(daemon.control) as ctl:
                results.update(scaling_section(ctl, daemon, scale))
                results.update(throughput_section(ctl, daemon, scale))
                results.update(m2b_section(ctl, daemon, scale))
                results.update(fairness_section(ctl, daemon, scale))
                results.update(balloon_section(ctl, daemon, scale))
                results["audit_clean"] = ctl.audit() == []
        finally:
            daemon.stop()
    return results


def throughput_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    memory = 4096
    domid, xc = guest(ctl, daemon, memory, "00:03.0")
    rows = []
    for batch in BATCHES:
        total = scale.ops_per_batch_size if batch > 1 else scale.ops_per_batch_size // 8
        before = next(d for d in ctl.list_domains() if d["domid"] == domid)["flushes"]
        full = throughput(xc, batch, total, 0x1000000, memory, echo=False)
        after = next(d for d in ctl.list_domains() if d["domid"] == domid)["flushes"]
        echo = throughput(xc, batch, total, 0x1000000, memory, echo=True)
        calls = 3 * 2 * max(total // (2 * batch), 1)  # three runs of map+unmap call pairs
        rows.append(
            {
                "batch": batch,
                "ops_per_s": round(full),
                "echo_ops_per_s": round(echo),
                "ratio": round(full / echo, 3),
                "flushes_added_per_call": round((after["added"] - before["added"]) / calls, 3),
                "flushes_modified_per_call": round((after["modified"] - before["modified"]) / calls, 3),
            }
        )
    one_map, one_unmap = map_unmap_frames(1, 0x2000000, memory)
    toggle = [one_map, one_unmap]

    def single() -> None:
        xc.iommu_op_raw(toggle[0], 1)
        toggle.reverse()

    p50, p99 = latencies(single, scale.latency_samples)
    e50, e99 = latencies(lambda: xc.echo(one_map, 1), scale.latency_samples)
    xc.close()
    ctl.destroy_domain(domid)
    return {
        "throughput": rows,
        "latency_us": {
            "p50": round(p50, 1),
            "p99": round(p99, 1),
            "echo_p50": round(e50, 1),
            "echo_p99": round(e99, 1),
            "p50_ratio": round(p50 / e50, 2),
        },
    }


def fill(xc: SyncHypercallClient, count: int, base: int, memory: int) -> None:
    for start in range(0, count, 32768):
        n = min(32768, count - start)
        ret, _ = xc.iommu_op_raw(
            bytes(ops.pack([ops.map_page(base + start + i, (start + i) % memory, ops.R) for i in range(n)])), n
        )
        assert ret == 0


def scaling_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    memory = 4096
    domid, xc = guest(ctl, daemon, memory, "00:04.0")
    rows, have = [], 0
    rss_at: dict[int, int] = {}
    throughput(xc, 256, scale.ops_per_batch_size, 0x1000000, memory, echo=False)  # warm up, untimed
    rss_start = daemon.rss_kib()
    for live in scale.live:
        fill(xc, live - have, 0x10000000 + have, memory)
        have = live
        rss_at[live] = daemon.rss_kib()
        rate = throughput(xc, 256, scale.ops_per_batch_size, 0x1000000, memory, echo=False)
        rows.append({"live_mappings": live, "ops_per_s": round(rate)})
    top = scale.live[-1]
    per_mapping = (rss_at[top] - rss_start) * 1024 / top
    xc.close()
    ctl.destroy_domain(domid)
    return {"scaling": rows, "bytes_per_live_mapping": round(per_mapping, 1)}


def m2b_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    """lookup_foreign_page and unmap/map_foreign_page with 1 and many M2B entries on one frame."""
    gid, gxc = guest(ctl, daemon, 64, "")
    dm = ctl.create_domain("pv", 16, target=gid)
    ctl.assign_device(dm["domid"], "00:06.0")
    xc = SyncHypercallClient.connect(daemon.hypercall, dm["token"])
    server = xc.create_ioreq_server(gid)
    rows = []
    for entries in (1, scale.m2b_entries):
        for start in range(0, entries, 8192):
            n = min(8192, entries - start)
            ret, _ = xc.iommu_op_raw(
                bytes(ops.pack([ops.map_foreign_page(0x100000 + start + i, 5, gid, server, ops.R) for i in range(n)])),
                n,
            )
            assert ret == 0
        lookups = bytes(ops.pack([ops.lookup_foreign_page(5, gid, server)] * 256))
        last = 0x100000 + entries - 1
        unmap = bytes(ops.pack([ops.unmap_foreign_page(last, server)]))
        remap = bytes(ops.pack([ops.map_foreign_page(last, 5, gid, server, ops.R)]))
        rounds = max(scale.ops_per_batch_size // 1024, 4)
        lookup_s = repeat(rounds, xc.iommu_op_raw, lookups, 256)
        began = time.perf_counter()
        for _ in range(rounds * 4):  # the same BFN out and back in: both succeed every time
            assert xc.iommu_op_raw(unmap, 1)[1][4:8] == b"\0\0\0\0"
            assert xc.iommu_op_raw(remap, 1)[1][4:8] == b"\0\0\0\0"
        cycle_s = time.perf_counter() - began
        rows.append(
            {
                "entries_on_frame": ctl.frame_info(domid=gid, gfn=5)["m2b_entries"],
                "lookup_ops_per_s": round(rounds * 256 / lookup_s),
                "unmap_map_pairs_per_s": round(rounds * 4 / cycle_s),
            }
        )
        for start in range(0, entries, 8192):
            n = min(8192, entries - start)
            xc.iommu_op_raw(
                bytes(ops.pack([ops.unmap_foreign_page(0x100000 + start + i, server) for i in range(n)])), n
            )
    xc.close()
    gxc.close()
    ctl.destroy_domain(dm["domid"])
    ctl.destroy_domain(gid)
    return {"m2b": rows}


def memory_section(directory: Path, scale: Scale) -> dict[str, Any]:
    daemon = Daemon(directory, scale.untouched_frames + 65536)
    try:
        with SyncControlClient.connect(daemon.control) as ctl:
            before = daemon.rss_kib()
            big = ctl.create_domain("hvm", scale.untouched_frames)
            after = daemon.rss_kib()
            ctl.destroy_domain(big["domid"])
    finally:
        daemon.stop()
    return {
        "bytes_per_untouched_guest_frame": round((after - before) * 1024 / scale.untouched_frames, 1),
        "untouched_guest_frames": scale.untouched_frames,
    }


def fairness_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    memory = 4096
    vid, victim = guest(ctl, daemon, memory, "00:07.0")
    fid, flooder = guest(ctl, daemon, memory, "00:08.0")
    one_map, one_unmap = map_unmap_frames(1, 0x3000000, memory)
    big_map, big_unmap = map_unmap_frames(65536, 0x4000000, memory)
    toggle = [one_map, one_unmap]

    def single() -> None:
        victim.iommu_op_raw(toggle[0], 1)
        toggle.reverse()

    alone = latencies(single, scale.fairness_samples)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            flooder.iommu_op_raw(big_map, 65536)
            flooder.iommu_op_raw(big_unmap, 65536)

    thread = threading.Thread(target=flood)
    thread.start()
    time.sleep(0.2)
    try:
        loaded = latencies(single, scale.fairness_samples)
    finally:
        stop.set()
        thread.join()
    victim.close()
    flooder.close()
    ctl.destroy_domain(vid)
    ctl.destroy_domain(fid)
    return {
        "fairness_us": {
            "alone_p50": round(alone[0], 1),
            "alone_p99": round(alone[1], 1),
            "flood_p50": round(loaded[0], 1),
            "flood_p99": round(loaded[1], 1),
        }
    }


def balloon_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    out = {}
    for swap in (False, True):
        n = scale.balloon_frames
        gid, gxc = guest(ctl, daemon, n + 16, "")
        dm = ctl.create_domain("pv", 16, target=gid)
        ctl.assign_device(dm["domid"], "00:09.0")
        xc = SyncHypercallClient.connect(daemon.hypercall, dm["token"])
        server = xc.create_ioreq_server(gid)
        xc.iommu_op_raw(
            bytes(ops.pack([ops.map_foreign_page(0x100000 + g, g, gid, server, swap_mfn=swap) for g in range(n)])), n
        )
        elapsed = 0.0
        for start in range(0, n, 500):  # within the ring: the call never waits for the emulator
            chunk = list(range(start, min(n, start + 500)))
            elapsed += timed(lambda: gxc.decrease_reservation(chunk))  # noqa: B023 - called at once
            if not swap:
                buffered, read_pointer, _ = xc.ioreq_fetch(server)
                xc.ioreq_ack(server, read_pointer)
                xc.iommu_op_raw(
                    bytes(ops.pack([ops.unmap_foreign_page(r.data, server) for r in buffered])), len(buffered)
                )
        out["swap_mfn" if swap else "invalidate"] = round(n / elapsed)
        xc.close()
        gxc.close()
        ctl.destroy_domain(dm["domid"])
        ctl.destroy_domain(gid)
    return {"balloon_frames_per_s": out}


def table(results: dict[str, Any]) -> str:
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
    bal = results["balloon_frames_per_s"]
    lines.append(
        f"balloon-out of emulator-mapped frames: {bal['invalidate']}/s with invalidates, "
        f"{bal['swap_mfn']}/s with swap_mfn"
    )
    lines.append(f"audit after the run: {'clean' if results['audit_clean'] else 'VIOLATIONS'}")
    return "\n".join(lines)


def compare(rev: str, quick: bool) -> dict[str, Any]:
    """The same benchmark from another git revision, run now (in a worktree of this checkout)."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="xenemu-rev-") as tmp:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", tmp, rev], check=True, capture_output=True
        )
        try:
            env = dict(os.environ, PYTHONPATH=tmp)
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
