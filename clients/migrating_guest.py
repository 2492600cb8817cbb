#!/usr/bin/env python3
"""A guest that keeps its device busy while it is live-migrated, and follows its domain.

Its CPU and its device work on one connection, as one guest with one assigned device would:

* **memory**: records of ``RECORD`` bytes at random slots of ``--pages`` data pages, each
  carrying its write's sequence number, the GFN and the slot (so any byte that is lost, stale or
  misplaced is seen); every other write is the CPU's (``guest_write``), the others the device's
  (``device_dma``) through the IOMMU ``map_page`` entries it makes at bring-up (BFN
  ``DMA_BFN + GFN``). ``ledger`` keeps, per slot, the last write whose reply said it was done;
* **MSIs**: after bringing its vITS up as Linux does (``its_guest_driver.Driver``), the device
  writes EventIDs to the vITS doorbell, round-robin over the device's events, and the guest
  takes each LPI (``lpi`` event), counts it and ends it (``its_end``). The device raises an event
  again only once the guest has taken that event's previous LPI: no two MSIs of one event are
  ever outstanding, so no coalescing is legitimate and each MSI acknowledged as sent must be
  taken exactly once (``msis``: per MSI its event, where it was sent and how often it was taken;
  ``unexpected``: LPIs taken with no MSI of theirs outstanding, each one a doubled LPI).

Every call is retried on ``EBUSY`` (the domain is stopped for its last section). ``ESRCH``, or
the connection closing, means the domain has left: the events the old connection still carries
are taken, the guest connects to ``--follow`` (the receiver's hypercall.sock) with the same token
and retries the call there (a call that got an error reply was not done). It runs until
``--after-move`` seconds after the move (fails if there is none within ``--timeout``), then
waits ``--msi-timeout`` for the LPIs still owed, and writes its result for the verdict
(``migration_verdict.py``), which reads the memory back on the receiver.
"""

from __future__ import annotations

import random
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import program_args, report, resolve, run_program, write_result
from its_guest_driver import Driver

from xenemu.abi import pv_iommu as ops
from xenemu.client import ConnectionLost, HypercallClient, XenError

T = TypeVar("T")
EBUSY, ESRCH = 16, 3
PAGE = 4096
#: Bytes of one sequence-numbered write; a page holds ``PAGE // RECORD`` slots.
RECORD = 256
SLOTS = PAGE // RECORD
#: The first data page (the vITS tables of ``its_guest_driver`` sit below it).
DATA_GFN = 0x1000
#: The device reaches data page GFN at BFN ``DMA_BFN + GFN`` (its own ``map_page`` entries).
DMA_BFN = 0x20000
TRANSLATER = 0x10040
HEAD = struct.Struct("<QQII")


def record(seq: int, gfn: int, slot: int) -> bytes:
    """What write ``seq`` puts in ``slot`` of ``gfn``: a header, then a filler made of it."""
    head = HEAD.pack(seq, gfn, slot, 0x4D494752)  # "MIGR"
    fill = (seq * 2654435761 + gfn * 40503 + slot) & 0xFFFFFFFF
    return head + fill.to_bytes(4, "little") * ((RECORD - HEAD.size) // 4)


class Moved(Exception):
    """The domain left this daemon (``ESRCH`` or the connection closed)."""


class Guest:
    def __init__(self, args: Any, token: str) -> None:
        self.args = args
        self.token = token
        self.xc: HypercallClient | None = None
        self.where = "source"
        self.moved_at: float | None = None
        self.busy = 0
        self.reconnects = 0
        self.writes = {"cpu": 0, "dma": 0}
        self.ledger: dict[int, int] = {}  # gfn * SLOTS + slot -> last acknowledged sequence number
        # -- MSIs: one outstanding per event at most
        self.outstanding: dict[int, int] = {}  # event -> index in msis
        self.msis: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.not_sent = 0  # MSIs whose write got an error reply (not done; raised again)
        self.events = 0
        self.intid_event: dict[int, int] = {}
        self.bdf = ""
        self.doorbell = 0

    # -- the connection, and following the domain ---------------------------------------------
    async def connect(self, path: str) -> HypercallClient:
        deadline = trio.current_time() + 30
        while True:
            try:
                return await HypercallClient.connect(path, self.token)
            except (OSError, XenError, ConnectionLost):
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.01)

    async def follow(self) -> None:
        """Take what the old connection still carries, then reconnect where the domain went."""
        old, self.xc = self.xc, None
        assert old is not None
        with trio.move_on_after(2):
            try:
                while True:
                    self.take(await old.next_event(), taken_on=self.where)
            except ConnectionLost:
                pass
        self.drain(old)
        await old.aclose()
        if self.where == "receiver":
            raise RuntimeError("the domain left the receiver too")
        self.where, self.moved_at = "receiver", trio.current_time()
        self.reconnects += 1
        self.xc = await self.connect(self.args.follow)

    async def call(self, fn: Callable[[HypercallClient], Awaitable[T]]) -> T:
        """One call, retried while the domain is stopped and after it moved."""
        while True:
            assert self.xc is not None
            try:
                result = await fn(self.xc)
            except XenError as exc:
                if exc.errno == EBUSY:
                    self.busy += 1
                    await trio.sleep(0.001)
                    continue
                if exc.errno != ESRCH or self.args.follow is None:
                    raise
                await self.follow()
                continue
            except ConnectionLost:
                if self.args.follow is None:
                    raise
                await self.follow()
                continue
            self.drain(self.xc)
            return result

    # -- LPIs ------------------------------------------------------------------------------------
    def drain(self, xc: HypercallClient) -> None:
        while xc.events:
            self.take(xc.events.popleft(), taken_on=self.where)

    def take(self, event: dict[str, Any], taken_on: str) -> None:
        if event.get("event") != "lpi":
            return
        self.ends.append((event["vcpu"], event["intid"], taken_on))
        ev = self.intid_event.get(event["intid"])
        at = self.outstanding.pop(ev, None) if ev is not None else None
        if at is None:
            self.unexpected.append({"intid": event["intid"], "vcpu": event["vcpu"], "taken_on": taken_on})
            return
        self.msis[at]["taken"] += 1
        self.msis[at]["taken_on"] = taken_on

    async def end_lpis(self) -> None:
        while self.ends:
            vcpu, intid, taken_on = self.ends.pop(0)
            await self.call(lambda xc, v=vcpu, i=intid: xc.its_end(v, i))
            if taken_on != self.where:
                self.ended_elsewhere += 1  # taken on the source, in service across the move

    async def raise_msi(self) -> None:
        """The device raises the next event that has no MSI outstanding (if any)."""
        for step in range(self.events):
            event = (self.next_event + step) % self.events
            if event in self.outstanding:
                continue
            self.next_event = event + 1
            data = event.to_bytes(4, "little")
            reply = await self.call(lambda xc, d=data: xc.device_dma(self.bdf, self.doorbell, d))
            if not reply["ok"]:
                raise RuntimeError(f"the doorbell write faulted: {reply.get('reason')}")
            self.outstanding[event] = len(self.msis)
            self.msis.append({"event": event, "sent_on": self.where, "taken": 0, "t": round(time.monotonic(), 4)})
            return

    # -- memory ----------------------------------------------------------------------------------
    async def write(self, seq: int, rng: random.Random) -> None:
        gfn = DATA_GFN + rng.randrange(self.args.pages)
        slot = rng.randrange(SLOTS)
        data = record(seq, gfn, slot)
        if seq % 2:
            await self.call(lambda xc: xc.guest_write(gfn, data, slot * RECORD))
            self.writes["cpu"] += 1
        else:
            addr = ((DMA_BFN + gfn) << 12) + slot * RECORD
            reply = await self.call(lambda xc: xc.device_dma(self.bdf, addr, data))
            if not reply["ok"]:
                raise RuntimeError(f"DMA to BFN {DMA_BFN + gfn:#x} faulted: {reply.get('reason')}")
            self.writes["dma"] += 1
        self.ledger[gfn * SLOTS + slot] = seq

    # -- the run ---------------------------------------------------------------------------------
    async def bring_up(self) -> dict[str, Any]:
        assert self.xc is not None
        info = await self.xc.domain_info()
        device = next(d for d in info["its"]["devices"])
        self.bdf, self.events = device["bdf"], device["events"]
        self.doorbell = info["its"]["frames"][str(device["pits"])] + TRANSLATER
        driver = Driver(self.xc, info)
        bringup = await driver.bring_up()
        n = info["its"]["devices"].index(device)
        self.intid_event = {driver.lpi(n, e): e for e in range(self.events)}
        for at in range(0, self.args.pages, 512):
            gfns = range(DATA_GFN + at, DATA_GFN + min(at + 512, self.args.pages))
            got = await self.xc.iommu_op([ops.map_page(DMA_BFN + g, g) for g in gfns])
            if ops.statuses(got) != ["OK"] * len(gfns):
                raise RuntimeError(f"map_page refused: {sorted(set(ops.statuses(got)))}")
        return {"domid": info["domid"], "bringup_seconds": round(bringup, 4), "events": self.events}

    async def run(self) -> dict[str, Any]:
        self.ends: list[tuple[int, int, str]] = []
        self.ended_elsewhere = 0
        self.next_event = 0
        self.xc = await self.connect(self.args.socket)
        summary = await self.bring_up()
        write_result(self.args.ready_file, summary)
        rng = random.Random(self.args.seed)
        started = trio.current_time()
        seq = 0
        period = 1.0 / self.args.rate
        while True:
            now = trio.current_time()
            if self.moved_at is not None and now - self.moved_at >= self.args.after_move:
                break
            if self.moved_at is None and now - started > self.args.timeout:
                raise TimeoutError(f"the domain did not move within {self.args.timeout:g} s")
            seq += 1
            await self.write(seq, rng)
            if seq % self.args.msi_every == 0:
                for _ in range(self.args.msi_burst):
                    await self.raise_msi()
            await self.end_lpis()
            await trio.sleep(max(0.0, started + seq * period - trio.current_time()))
        deadline = trio.current_time() + self.args.msi_timeout
        with trio.move_on_at(deadline):
            while self.outstanding:
                assert self.xc is not None
                self.take(await self.xc.next_event(), taken_on=self.where)
                await self.end_lpis()
        await self.end_lpis()
        assert self.xc is not None
        await self.xc.aclose()
        summary.update(
            ok=True,
            where=self.where,
            writes=self.writes,
            busy_retries=self.busy,
            reconnects=self.reconnects,
            lpis_in_service_across_the_move=self.ended_elsewhere,
            seconds=round(trio.current_time() - started, 3),
            pages=self.args.pages,
            data_gfn=DATA_GFN,
            record=RECORD,
            ledger={str(k): v for k, v in sorted(self.ledger.items())},
            msis=self.msis,
            unexpected=self.unexpected,
        )
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = program_args(__doc__)
    parser.add_argument("--follow", help="the receiver's hypercall.sock: where the domain goes")
    parser.add_argument("--pages", type=int, default=1024, help="data pages the writes go to")
    parser.add_argument("--rate", type=float, default=1000.0, help="writes per second")
    parser.add_argument("--msi-every", type=int, default=4, help="an MSI after every N writes")
    parser.add_argument("--msi-burst", type=int, default=1, help="MSIs (of distinct events) each time")
    parser.add_argument("--after-move", type=float, default=2.0, help="seconds to go on after the move")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the domain to move")
    parser.add_argument("--msi-timeout", type=float, default=2.0, help="seconds to wait for LPIs owed at the end")
    parser.add_argument("--ready-file", type=Path, help="written once bring-up is done")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    guest = Guest(args, resolve(args.token))
    return report(args.result, trio.run(guest.run))


if __name__ == "__main__":
    sys.exit(run_program(main))
