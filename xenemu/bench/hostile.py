"""The hostile section: a victim's latency while another domain sends each kind of hostile batch,
and what sparse mappings cost the daemon.

Each attacker runs in a process of its own, looping one kind of batch as fast as the daemon
answers: ``invalid`` (65,536 ops with reserved flag bits), ``failing`` (order-13 unmaps that
fail on their last page: 8,192 page checks each, a slice and more of work per op), and
``sparse`` (maps 512 BFNs apart, each needing a leaf of its own, then unmaps); and
``lifecycle``: the toolstack building and destroying a guest of 64K pages with 64K mappings,
over and over (the guest decides how much its teardown gives back). Target: the victim's p99
within 2 ms.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from xenemu.bench.harness import Daemon, Scale, guest, latencies, single_op_call
from xenemu.client import SyncControlClient

ATTACKER = """
import sys
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncHypercallClient
socket, token, kind = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "invalid":
    batches = [bytes(ops.pack([ops.Op(ops.MAP_PAGE, 1 << 3 | 3, i, i) for i in range(65536)]))]
elif kind == "failing":
    batches = [bytes(ops.pack([ops.unmap_page(0, 13)] * 64))]
else:
    batches = [
        bytes(ops.pack([ops.map_page((1 << 30) + 512 * i, i % 16) for i in range(1024)])),
        bytes(ops.pack([ops.unmap_page((1 << 30) + 512 * i) for i in range(1024)])),
    ]
if kind == "lifecycle":  # socket is the control socket here
    from xenemu.client import SyncControlClient
    ctl = SyncControlClient.connect(socket)
    print("attacking", flush=True)
    while True:
        dom = ctl.create_domain("hvm", 1 << 16)
        ctl.assign_device(dom["domid"], "00:0c.0")
        with SyncHypercallClient.connect(socket.replace("control.sock", "hypercall.sock"), dom["token"]) as xc:
            xc.iommu_op([ops.map_page((1 << 24) + g, g, order=9) for g in range(0, 1 << 16, 512)])
        ctl.destroy_domain(dom["domid"])
with SyncHypercallClient.connect(socket, token) as xc:
    if kind == "failing":
        xc.decrease_reservation([(1 << 13) - 1])  # each unmap now fails on its last page
    print("attacking", flush=True)
    while True:
        for raw in batches:
            xc.iommu_op_raw(raw, len(raw) // 32)
"""

KINDS = ("invalid", "failing", "sparse", "lifecycle")


def hostile_section(ctl: SyncControlClient, daemon: Daemon, scale: Scale) -> dict[str, Any]:
    memory = 4096
    vid, victim = guest(ctl, daemon, memory, "00:0a.0")
    single = single_op_call(victim, memory)
    alone = latencies(single, scale.fairness_samples)
    out: dict[str, Any] = {"alone_p99": round(alone[1], 1)}
    for kind in KINDS:
        attacker = ctl.create_domain("hvm", 1 << 13 if kind == "failing" else 16)
        ctl.assign_device(attacker["domid"], "00:0b.0")
        before = ctl.stats()["page_table_bytes"]
        socket = daemon.control if kind == "lifecycle" else daemon.hypercall
        proc = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, str(socket), attacker["token"], kind],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "attacking\n"
            time.sleep(0.3)
            loaded = latencies(single, scale.fairness_samples)
            grown = ctl.stats()["page_table_bytes"] - before
        finally:
            proc.kill()
            proc.wait()
        out[kind] = {"p50": round(loaded[0], 1), "p99": round(loaded[1], 1)}
        if kind == "sparse":
            out["sparse_bytes_per_mapping_peak"] = round(grown / 1024, 1)
        ctl.destroy_domain(attacker["domid"])
    victim.close()
    ctl.destroy_domain(vid)
    return {"hostile_us": out}
