"""The vITS section: guest commands per second, MSIs end to end, a victim's command latency
under a flooding guest, and the elision policies' physical commands per guest command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xenemu.bench.harness import Daemon, Scale, latencies, timed
from xenemu.client import SyncControlClient, SyncHypercallClient

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
                room = (self.xc.its_read("its", 0, 0x90, 8) - self.cwriter - 32) % 65536 // 32
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
from xenemu.bench.vits import VitsGuest
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
