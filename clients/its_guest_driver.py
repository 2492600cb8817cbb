#!/usr/bin/env python3
"""A guest ITS driver that brings up its vITS the way Linux's GICv3 ITS driver does.

In its own RAM: a device table and a collection table (GITS_BASER0/1), a 64 KiB command queue,
an LPI configuration table and one pending table per vCPU. Then one collection per vCPU (MAPC,
then INVALL), MAPD per device (its ITT sized for at least 32 events, as Linux does) and MAPTI
per event, every command but MAPD followed by a SYNC, CREADR polled with a 1 s timeout; LPIs
are enabled in the configuration table and each collection invalidated. Afterwards it takes
interrupts, ending each, and counts them per vCPU and per INTID, until ``--until-file`` appears
(plus ``--grace`` seconds) or ``--duration``.

With ``--flood N`` it is a misbehaving guest instead: after bring-up it keeps its queue full with
N commands, INVALLs and SYNCs, toggling LPI configuration bytes between them.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import program_args, report, resolve, run_program, write_result

from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.client import HypercallClient

LPI = 8192
PAGE = 4096
QUEUE_GFN, QUEUE_PAGES = 0x100, 16  # 64 KiB
DEVICE_TABLE_GFN, COLLECTION_TABLE_GFN = 0x110, 0x120
PROP_GFN, PEND_GFN = 0x130, 0x140
ID_BITS = 14  # INTIDs below 16,384
ITT_GFN = 0x180
QUEUE_BYTES = QUEUE_PAGES * PAGE


class Driver:
    def __init__(self, xc: HypercallClient, info: dict[str, Any]) -> None:
        self.xc = xc
        self.vcpus = info["its"]["vcpus"]
        self.devices = info["its"]["devices"]
        self.cwriter = 0
        self.commands = 0

    async def its(self, offset: int, size: int, value: int | None = None) -> Any:
        return await self.xc.its_mmio("its", 0, offset, size, value)

    async def probe(self) -> None:
        if (await self.its(0xFFE8, 4)) & 0xF0 != 0x30:
            raise RuntimeError("not a GICv3 ITS (GITS_PIDR2.ArchRev)")
        if not (await self.its(0x8, 8)) & 1:
            raise RuntimeError("GITS_TYPER.Physical is clear")

    async def tables(self) -> None:
        await self.its(0x100, 8, 1 << 63 | 1 << 56 | DEVICE_TABLE_GFN * PAGE)
        await self.its(0x108, 8, 1 << 63 | 4 << 56 | COLLECTION_TABLE_GFN * PAGE)
        await self.its(0x80, 8, 1 << 63 | QUEUE_GFN * PAGE | (QUEUE_PAGES - 1))
        await self.its(0x88, 8, 0)
        for vcpu in range(self.vcpus):
            await self.xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN * PAGE | (ID_BITS - 1))
            await self.xc.its_mmio("redist", vcpu, 0x78, 8, (PEND_GFN + 4 * vcpu) * PAGE | 1 << 62)  # PTZ
            await self.xc.its_mmio("redist", vcpu, 0x0, 4, 1)
        await self.its(0x0, 4, 1)

    async def send(self, *commands: ItsCommand) -> None:
        """Write the commands at CWRITER, move it, and poll CREADR until they are all done."""
        for command in commands:
            await self.wait_for_room()
            await self.xc.guest_write(QUEUE_GFN + self.cwriter // PAGE, command.encode(), self.cwriter % PAGE)
            self.cwriter = (self.cwriter + 32) % QUEUE_BYTES
            self.commands += 1
        await self.its(0x88, 8, self.cwriter)
        await self.wait_idle()

    async def wait_for_room(self) -> None:
        while (self.cwriter + 32) % QUEUE_BYTES == await self.its(0x90, 8):
            await trio.sleep(0.001)

    async def wait_idle(self, timeout: float = 1.0) -> None:
        deadline = trio.current_time() + timeout
        while await self.its(0x90, 8) != self.cwriter:
            if trio.current_time() > deadline:
                raise TimeoutError("ITS queue timeout: CREADR did not reach CWRITER within 1 s")
            await trio.sleep(0.0005)

    def lpi(self, device: int, event: int) -> int:
        return LPI + 32 + device * 256 + event

    async def bring_up(self) -> float:
        started = time.perf_counter()
        await self.probe()
        await self.tables()
        for vcpu in range(self.vcpus):
            await self.send(c.mapc(vcpu, vcpu), c.sync(vcpu))
            await self.send(c.invall(vcpu), c.sync(vcpu))
        for n, device in enumerate(self.devices):
            # as Linux sizes a PCI device's ITT: at least 32 events, a power of two
            nr_ites = max(32, 1 << (device["events"] - 1).bit_length())
            await self.send(c.mapd(device["vdevid"], nr_ites.bit_length() - 2, (ITT_GFN + n) * PAGE))
            for event in range(device["events"]):
                vcpu = event % self.vcpus
                await self.send(c.mapti(device["vdevid"], event, self.lpi(n, event), vcpu), c.sync(vcpu))
        for n, device in enumerate(self.devices):
            for event in range(device["events"]):
                await self.set_config(self.lpi(n, event), True)
        for vcpu in range(self.vcpus):
            await self.send(c.invall(vcpu), c.sync(vcpu))
        return time.perf_counter() - started

    async def set_config(self, intid: int, enabled: bool) -> None:
        offset = intid - LPI
        await self.xc.guest_write(PROP_GFN + offset // PAGE, bytes([0xA0 | 2 | int(enabled)]), offset % PAGE)

    async def flood(self, count: int) -> int:
        """Keep the queue full: INVALLs and SYNCs, with configuration toggles in between."""
        sent = 0
        toggle = False
        while sent < count:
            creadr = await self.its(0x90, 8)
            room = (creadr - self.cwriter - 32) % QUEUE_BYTES // 32
            # as many as fit, up to the end of this queue page: one write of guest RAM
            n = min(room, count - sent, (PAGE - self.cwriter % PAGE) // 32)
            if n == 0:
                await trio.sleep(0.0005)
                continue
            block = b"".join(
                (c.invall(i % self.vcpus) if i % 2 == 0 else c.sync(i % self.vcpus)).encode()
                for i in range(sent, sent + n)
            )
            await self.xc.guest_write(QUEUE_GFN + self.cwriter // PAGE, block, self.cwriter % PAGE)
            self.cwriter = (self.cwriter + 32 * n) % QUEUE_BYTES
            sent += n
            await self.its(0x88, 8, self.cwriter)
            toggle = not toggle
            if self.devices:
                await self.set_config(self.lpi(0, 0), toggle)
        await self.wait_idle(timeout=120)
        return sent


async def run(args: Any) -> dict[str, Any]:
    if args.after:
        await trio.to_thread.run_sync(resolve, "@" + args.after)
    async with await HypercallClient.connect(args.socket, resolve(args.token)) as xc:
        info = await xc.domain_info()
        driver = Driver(xc, info)
        bringup = await driver.bring_up()
        summary: dict[str, Any] = {
            "domid": info["domid"],
            "bringup_seconds": round(bringup, 4),
            "commands": driver.commands,
            "vcpus": driver.vcpus,
        }
        write_result(args.ready_file, summary)
        if args.flood:
            summary["flood_commands"] = await driver.flood(args.flood)
        per_vcpu: Counter[int] = Counter()
        per_intid: Counter[int] = Counter()
        deadline = trio.current_time() + args.duration if args.duration else None
        stop_at: float | None = None
        while True:
            now = trio.current_time()
            if args.until_file is not None and stop_at is None and args.until_file.exists():
                stop_at = now + args.grace
            if (deadline is not None and now >= deadline) or (stop_at is not None and now >= stop_at):
                break
            if args.flood and args.until_file is None and not args.duration:
                break
            with trio.move_on_after(0.05):
                event = await xc.next_event()
                if event.get("event") == "lpi":
                    per_vcpu[event["vcpu"]] += 1
                    per_intid[event["intid"]] += 1
                    await xc.its_end(event["vcpu"], event["intid"])
        summary["interrupts_per_vcpu"] = {str(k): v for k, v in sorted(per_vcpu.items())}
        summary["interrupts_per_intid"] = {str(k): v for k, v in sorted(per_intid.items())}
        summary["interrupts"] = sum(per_vcpu.values())
        errors = []
        if args.bringup_bound is not None and bringup > args.bringup_bound:
            errors.append(f"bring-up took {bringup:.3f} s, over the {args.bringup_bound} s bound")
        if args.check_against is not None:
            errors += check_msis(driver, args.check_against, per_intid, summary)
        summary["ok"] = not errors
        if errors:
            summary["errors"] = errors
        return summary


def check_msis(driver: Driver, device_result: Path, per_intid: Counter[int], summary: dict[str, Any]) -> list[str]:
    """No MSI lost beyond coalescing (each event that fired arrives at least once) and none
    delivered twice (never more LPIs than MSIs sent)."""
    device = json.loads(device_result.read_text())
    n = next(i for i, d in enumerate(driver.devices) if d["vdevid"] == device["vdevid"])
    errors = []
    delivered_total = 0
    for event, sent in device["sent_per_event"].items():
        delivered = per_intid[driver.lpi(n, int(event))]
        delivered_total += delivered
        if delivered == 0:
            errors.append(f"event {event}: {sent} MSIs sent, none delivered")
        if delivered > sent:
            errors.append(f"event {event}: {delivered} LPIs delivered for {sent} MSIs")
    summary["msis_sent"] = device["sent"]
    summary["lpis_delivered"] = delivered_total
    summary["coalesced"] = device["sent"] - delivered_total
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = program_args(__doc__)
    parser.add_argument("--flood", type=int, default=0, help="misbehave: this many commands after bring-up")
    parser.add_argument("--bringup-bound", type=float, default=None, help="fail if bring-up takes longer (s)")
    parser.add_argument("--duration", type=float, default=0.0, help="take interrupts for this long (s)")
    parser.add_argument("--until-file", type=Path, help="take interrupts until this file appears")
    parser.add_argument("--grace", type=float, default=1.0, help="seconds to go on after --until-file appears")
    parser.add_argument("--ready-file", type=Path, help="write the bring-up summary here once done")
    parser.add_argument("--after", help="wait for this file before starting")
    parser.add_argument("--check-against", type=Path, help="a device program's result: check every MSI it sent")
    args = parser.parse_args(argv)
    try:
        summary = trio.run(run, args)
    except (TimeoutError, RuntimeError) as exc:
        summary = {"ok": False, "error": str(exc)}
    return report(args.result, summary)


if __name__ == "__main__":
    sys.exit(run_program(main))
