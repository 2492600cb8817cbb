"""The PV IOMMU sections: throughput against the echo, scaling with live mappings, the M2B,
memory per mapping and per untouched frame, a victim's latency under a flood, ballooning."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xenemu.abi import pv_iommu as ops
from xenemu.bench.harness import (
    BATCHES,
    Daemon,
    Scale,
    guest,
    latencies,
    map_unmap_frames,
    paired_latencies,
    repeat,
    single_op_call,
    throughput,
    timed,
)
from xenemu.client import SyncControlClient, SyncHypercallClient


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
            assert (xc.iommu_op_raw(unmap, 1)[1] or b"")[4:8] == b"\0\0\0\0"
            assert (xc.iommu_op_raw(remap, 1)[1] or b"")[4:8] == b"\0\0\0\0"
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
    single = single_op_call(victim, memory)
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
