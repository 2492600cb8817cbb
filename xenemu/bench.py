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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenemu.abi import pv_iommu as ops
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
    return percentiles([sample(call) for _ in range(samples)])


def paired_latencies(
    call: Callable[[], Any], baseline: Callable[[], Any], samples: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Both calls' p50/p99, sampled alternately so a burst of machine noise hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(samples):
        times[0].append(sample(call))
        times[1].append(sample(baseline))
    return percentiles(times[0]), percentiles(times[1])


def sample(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return times[len(times) // 2] * 1e6, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6


def run_bench(scale: Scale) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="xenemu-bench-") as tmp:
        # Each memory figure on a daemon of its own, so no freed memory is reused and hidden.
        results.update(memory_section(Path(tmp) / "memory", scale))
        results.update(vits_section(Path(tmp) / "vits", scale))
        daemon = Daemon(Path(tmp) / "main", 1_200_000)
        try:
            with SyncControlClient.connect(daemon.control) as ctl:
                results["fast_path"] = ctl.host_info().get("fast_path", False)
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

    (p50, p99), (e50, e99) = paired_latencies(single, lambda: xc.echo(one_map, 1), scale.latency_samples)
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
    for start in range(0, count, 4096):
        n = min(4096, count - start)
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


FLOODER = """
import sys
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncHypercallClient
socket, token, memory = sys.argv[1], sys.argv[2], int(sys.argv[3])
maps = bytes(ops.pack([ops.map_page(0x4000000 + i, i % memory) for i in range(65536)]))
unmaps = bytes(ops.pack([ops.unmap_page(0x4000000 + i) for i in range(65536)]))
with SyncHypercallClient.connect(socket, token) as xc:
    print("flooding", flush=True)
    while True:
        xc.iommu_op_raw(maps, 65536)
        xc.iommu_op_raw(unmaps, 65536)
"""


def fairness_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    """A victim's single-op latency, alone and while another domain streams 65,536-op batches
    from a process of its own (a thread here would share this process's interpreter lock)."""
    memory = 4096
    vid, victim = guest(ctl, daemon, memory, "00:07.0")
    flooder = ctl.create_domain("hvm", memory)
    ctl.assign_device(flooder["domid"], "00:08.0")
    one_map, one_unmap = map_unmap_frames(1, 0x3000000, memory)
    toggle = [one_map, one_unmap]

    def single() -> None:
        victim.iommu_op_raw(toggle[0], 1)
        toggle.reverse()

    alone = latencies(single, scale.fairness_samples)
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(daemon.hypercall), flooder["token"], str(memory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "flooding\n"
        time.sleep(0.3)
        loaded = latencies(single, scale.fairness_samples)
    finally:
        proc.kill()
        proc.wait()
    victim.close()
    ctl.destroy_domain(vid)
    ctl.destroy_domain(flooder["domid"])
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
    lines.append("physical commands per guest command:")
    lines.append(f"  {'policy':<7} {'bring-up':>9} {'enable-all-invall':>18} {'toggle-storm':>13}")
    for policy, row in vits["physical_per_guest_command"].items():
        lines.append(f"  {policy:<7} {row['bring-up']:>9} {row['enable-all-invall']:>18} {row['toggle-storm']:>13}")
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
            if (Path(tmp) / "xenemu" / "core" / "fast_build.py").exists():  # compile that revision's fast path
                subprocess.run(
                    [sys.executable, "-m", "xenemu.core.iommu.fast_build"],
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


# -- the vITS ------------------------------------------------------------------------------------------
QUEUE_GFN, PROP_GFN, ITT_GFN = 0x100, 0x130, 0x180
LPI = 8192


class VitsGuest:
    """A guest with its vITS enabled: a 64 KiB queue, a configuration table, two vCPUs."""

    def __init__(self, hypercall: Path, token: str, domid: int, vdev: int) -> None:
        self.domid, self.vdev = domid, vdev
        self.xc = SyncHypercallClient.connect(hypercall, token)
        self.cwriter = 0
        for reg, value in ((0x80, 1 << 63 | QUEUE_GFN << 12 | 15), (0x100, 1 << 63), (0x108, 1 << 63)):
            self.xc.its_mmio("its", 0, reg, 8, value)
        for vcpu in range(2):
            self.xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN << 12 | 13)
            self.xc.its_mmio("redist", vcpu, 0x0, 4, 1)
        self.xc.its_mmio("its", 0, 0x0, 4, 1)

    @classmethod
    def create(cls, ctl: SyncControlClient, daemon: Daemon, devid: int, events: int) -> tuple[VitsGuest, str]:
        reply = ctl.create_domain("hvm", 512, vcpus=2)
        vdev = ctl.assign_device(reply["domid"], f"{devid % 256:02x}:0a.0", its_devid=devid, its_events=events)
        return cls(daemon.hypercall, reply["token"], reply["domid"], vdev["vdevid"]), reply["token"]

    def send(self, blocks: list[bytes], wait: bool = True) -> None:
        for start in range(0, len(blocks), 64):
            chunk = blocks[start : start + 64]
            while True:
                room = (self.xc.its_mmio("its", 0, 0x90, 8) - self.cwriter - 32) % 65536 // 32
                n = min(len(chunk), room, (4096 - self.cwriter % 4096) // 32)
                if n:
                    break
                time.sleep(0.0002)
            self.xc.guest_write(QUEUE_GFN + self.cwriter // 4096, b"".join(chunk[:n]), self.cwriter % 4096)
            self.cwriter = (self.cwriter + 32 * n) % 65536
            self.xc.its_mmio("its", 0, 0x88, 8, self.cwriter)
            if n < len(chunk):
                self.send(chunk[n:], wait=False)
        if wait:
            while self.xc.its_mmio("its", 0, 0x90, 8) != self.cwriter:
                pass


VITS_FLOODER = """
import sys
from pathlib import Path
from xenemu.bench import VitsGuest
from xenemu.abi import its_cmd as c
guest = VitsGuest.__new__(VitsGuest)
guest.domid, guest.vdev, guest.cwriter = int(sys.argv[3]), 0, 0
from xenemu.client import SyncHypercallClient
guest.xc = SyncHypercallClient.connect(sys.argv[1], sys.argv[2])
guest.cwriter = guest.xc.its_mmio("its", 0, 0x88, 8)
blocks = [(c.invall(i % 2) if i % 2 else c.sync(i % 2)).encode() for i in range(4096)]
print("flooding", flush=True)
while True:
    guest.send(blocks, wait=False)
"""


def vits_section(directory: Path, scale: Scale) -> dict[str, Any]:
    from xenemu.abi import its_cmd as c

    daemon = Daemon(directory, 65536)
    try:
        with SyncControlClient.connect(daemon.control) as ctl:
            victim, _ = VitsGuest.create(ctl, daemon, 0x70, 32)
            victim.send([c.mapc(0, 0).encode(), c.mapc(1, 1).encode(), c.mapd(victim.vdev, 4, ITT_GFN << 12).encode()])
            victim.send([c.mapti(victim.vdev, e, LPI + 32 + e, e % 2).encode() for e in range(32)])
            victim.xc.guest_write(PROP_GFN, bytes([0xA3] * 32), 32)
            victim.send([c.invall(0).encode(), c.invall(1).encode()])
            n = scale.latency_samples
            stream = [c.sync(i % 2).encode() for i in range(max(n, 1024))]
            commands_per_s = len(stream) / timed(lambda: victim.send(stream))

            def one() -> None:
                victim.send([c.sync(0).encode(), c.sync(1).encode()])

            def passes() -> int:
                total: int = ctl.its_stats()["pits"][0]["passes"]
                return total

            p0 = passes()
            alone = latencies(one, n // 4)
            passes_alone = (passes() - p0) / (n // 4)
            flooder, token = VitsGuest.create(ctl, daemon, 0x71, 4)
            flooder.send([c.mapc(0, 0).encode(), c.mapc(1, 1).encode()])
            flooder.xc.close()
            proc = subprocess.Popen(
                [sys.executable, "-c", VITS_FLOODER, str(daemon.hypercall), token, str(flooder.domid)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None and proc.stdout.readline() == "flooding\n"
                time.sleep(0.3)
                p0 = passes()
                loaded = latencies(one, n // 4)
                passes_loaded = (passes() - p0) / (n // 4)
            finally:
                proc.kill()
                proc.wait()
            doorbell = int(ctl.its_info(victim.domid)["its_frames"]["0"]) + 0x10040
            bdf = f"{0x70:02x}:0a.0"
            msis = scale.latency_samples

            def raise_and_take() -> None:
                """Device DMA to the doorbell, the guest's LPI event, its end: one after another."""
                for i in range(msis):
                    victim.xc.device_dma(bdf, doorbell, (i % 32).to_bytes(4, "little"))
                    event = victim.xc.next_event(timeout=5)
                    assert event is not None and event.get("event") == "lpi", event
                    victim.xc.its_end(event["vcpu"], event["intid"])

            msi_rate = msis / timed(raise_and_take)
            victim.xc.close()
    finally:
        daemon.stop()
    return {
        "vits": {
            "guest_commands_per_s": round(commands_per_s),
            "victim_ms": {
                "alone_p50": round(alone[0] / 1000, 3),
                "alone_p99": round(alone[1] / 1000, 3),
                "flood_p50": round(loaded[0] / 1000, 3),
                "flood_p99": round(loaded[1] / 1000, 3),
                "passes_per_call_alone": round(passes_alone, 2),
                "passes_per_call_flood": round(passes_loaded, 2),
            },
            "msis_per_s": round(msi_rate),
            "physical_per_guest_command": elision_table(),
        }
    }


def elision_table() -> dict[str, dict[str, float]]:
    """Physical commands per guest command for three guest patterns under each policy (in-core,
    deterministic: the pITS is stepped to completion)."""
    from xenemu.abi import its_cmd as c
    from xenemu.core.host import Host
    from xenemu.core.options import HostOptions

    def run(policy: str, pattern: str) -> float:
        host = Host(HostOptions(nr_frames=8192, dom0_memory=64, its_elision=policy, its_queue_slots=4096))
        its = host.its
        dom = host.create_domain("hvm", 1024, vcpus=2)
        for d in range(8):
            its.assign(dom.domid, 0x100 + d, 0, 32, d)
        state = its.pits[0]
        offset = 0
        guest_commands = 0

        def mmio(reg: int, value: int) -> None:
            its.mmio_write(dom.domid, 0, reg, 8, value)

        def queue(blocks: list[bytes]) -> None:
            nonlocal offset, guest_commands
            for block in blocks:
                host.memory.access(dom.domid, QUEUE_GFN + offset // 4096, offset % 4096, block)
                offset = (offset + 32) % 65536
                guest_commands += 1
            mmio(0x88, offset)
            for _ in range(100000):
                its.run_passes()
                if not state.hw.step(10**6) and not its.raised and its.domains[dom.domid].vits[0].creadr == offset:
                    break
                its.deliver()

        def toggle(vlpi: int, on: bool) -> None:
            value = 0xA2 | int(on)
            host.memory.access(dom.domid, PROP_GFN + (vlpi - LPI) // 4096, (vlpi - LPI) % 4096, bytes([value]))
            its.config_written(dom.domid, vlpi, value)
            its.run_passes()

        for reg, value in ((0x80, 1 << 63 | QUEUE_GFN << 12 | 15), (0x100, 1 << 63), (0x108, 1 << 63)):
            mmio(reg, value)
        for vcpu in range(2):
            its.redist_write(dom.domid, vcpu, 0x70, 8, PROP_GFN << 12 | 13)
            its.redist_write(dom.domid, vcpu, 0x0, 4, 1)
        its.mmio_write(dom.domid, 0, 0x0, 4, 1)
        before = sum(state.physical.values())
        bringup = [c.mapc(0, 0), c.sync(0), c.invall(0), c.sync(0), c.mapc(1, 1), c.sync(1), c.invall(1), c.sync(1)]
        for d in range(8):
            bringup.append(c.mapd(d, 4, (ITT_GFN + d) << 12))
            for e in range(32):
                bringup += [c.mapti(d, e, LPI + 32 + d * 32 + e, e % 2), c.sync(e % 2)]
        queue([x.encode() for x in bringup])
        if pattern == "bring-up":
            return round((sum(state.physical.values()) - before) / guest_commands, 3)
        before, guest_commands = sum(state.physical.values()), 0
        if pattern == "enable-all-invall":
            for d in range(8):
                for e in range(32):
                    toggle(LPI + 32 + d * 32 + e, True)
            queue([c.invall(0).encode(), c.sync(0).encode(), c.invall(1).encode(), c.sync(1).encode()])
        else:  # a toggle storm: Linux's configuration update, INV then SYNC, over and over
            for i in range(512):
                vlpi = LPI + 32 + i % 256
                toggle(vlpi, i % 3 != 0)
                d, e = (vlpi - LPI - 32) // 32, (vlpi - LPI - 32) % 32
                queue([c.event_cmd(c.INV, d, e).encode(), c.sync(e % 2).encode()])
        return round((sum(state.physical.values()) - before) / guest_commands, 3)

    return {
        policy: {pattern: run(policy, pattern) for pattern in ("bring-up", "enable-all-invall", "toggle-storm")}
        for policy in ("lazy", "eager", "off")
    }
