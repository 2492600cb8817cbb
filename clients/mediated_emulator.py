#!/usr/bin/env python3
"""A mediated pass-through emulator in the spirit of XenGT, against xenemu.

It serves one guest through an IOREQ server:
  * ``query_caps`` decides how it gets bus addresses: with ``map_cap`` it chooses BFNs itself
    (``map_foreign_page`` at ``--bfn-base + gfn``), without it asks Xen (``lookup_foreign_page``);
  * its device reads the guest's pages by DMA through those BFNs while it runs;
  * every ``IOREQ_TYPE_INVALIDATE`` (buffered ring or synchronous) makes it unmap that BFN at once,
    acknowledge the ring, and complete the synchronous request; pages the guest gives back later
    are mapped again when they reappear;
  * on SIGTERM/SIGINT, ``--duration`` or a closed stdin (``--until-stdin-closes``) it unmaps
    everything, destroys its server and prints a JSON summary;
  * with ``--ioserver`` it serves through a server it already has (its device-model domain was
    restored with its guest, PROTOCOL.md section 14): it reads what its ring holds first, then
    maps its pages again, which its kept mappings answer at once (an identical mapping takes nothing).
It prints one JSON line ``{"ready": ...}`` once its pages are mapped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import report, resolve, run_program, write_result

from xenemu.abi import pv_iommu as ops
from xenemu.abi.ioreq import BufferedRequest, SyncRequest
from xenemu.client import HypercallClient

IOREQ_TYPE_INVALIDATE = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--token", required=True, help="the emulator domain's token, or @FILE")
    parser.add_argument("--guest", required=True, help="the guest's domid, or @FILE")
    parser.add_argument("--gfns", default="0:64", help="START:COUNT of guest frames to map")
    parser.add_argument("--bdf", help="the emulator's device (default: its first)")
    parser.add_argument("--bfn-base", type=lambda v: int(v, 0), default=0x80000)
    parser.add_argument("--swap", action="store_true", help="map with swap_mfn")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until signalled)")
    parser.add_argument("--until-stdin-closes", action="store_true")
    parser.add_argument("--until-file", type=Path, help="stop once this file exists")
    parser.add_argument("--ready-file", type=Path, help="create this file once the pages are mapped")
    parser.add_argument("--remap-interval", type=float, default=0.05)
    parser.add_argument("--result", type=Path, help="also write the summary here")
    parser.add_argument(
        "--ioserver", type=int, default=None, help="serve through this existing server (after a restore)"
    )
    return parser.parse_args(argv)


class Emulator:
    def __init__(self, xc: HypercallClient, args: argparse.Namespace) -> None:
        self.xc = xc
        self.args = args
        start, _, count = args.gfns.partition(":")
        self.gfns = range(int(start, 0), int(start, 0) + int(count or "1", 0))
        self.server = 0
        self.map_cap = False
        #: gfn -> bfn for pages mapped now; bfn -> gfn to route invalidates.
        self.mapped: dict[int, int] = {}
        self.by_bfn: dict[int, int] = {}
        self.lost: set[int] = set()
        self.stats: dict[str, int] = {
            "buffered_invalidates": 0,
            "sync_invalidates": 0,
            "unmapped_on_invalidate": 0,
            "remapped": 0,
            "dma_ok": 0,
            "dma_faults": 0,
        }

    async def start(self) -> None:
        if self.args.ioserver is None:
            self.server = await self.xc.create_ioreq_server(self.args.guest)
        else:  # restored with its guest: what the ring held at the save is read before anything else
            self.server = self.args.ioserver
            await self.handle_ioreqs()
        (caps,) = await self.xc.iommu_op([ops.query_caps()])
        self.map_cap = bool(caps.flags & ops.MAP_CAP)
        await self.map_pages(list(self.gfns))

    async def map_pages(self, gfns: list[int]) -> int:
        """Map what it can of ``gfns``; ones the guest has ballooned out stay lost for now."""
        done = 0
        for i in range(0, len(gfns), self.args.batch):
            chunk = gfns[i : i + self.args.batch]
            if self.map_cap:
                batch = [
                    ops.map_foreign_page(
                        self.args.bfn_base + g, g, self.args.guest, self.server, swap_mfn=self.args.swap
                    )
                    for g in chunk
                ]
            else:
                batch = [ops.lookup_foreign_page(g, self.args.guest, self.server) for g in chunk]
            for gfn, op in zip(chunk, await self.xc.iommu_op(batch), strict=True):
                if op.status == 0:
                    self.mapped[gfn] = op.bfn
                    self.by_bfn[op.bfn] = gfn
                    self.lost.discard(gfn)
                    done += 1
                else:
                    self.lost.add(gfn)
        return done

    async def unmap_bfns(self, bfns: list[int]) -> None:
        batch = [ops.unmap_foreign_page(b, self.server) for b in bfns]
        if batch:
            await self.xc.iommu_op(batch)
        for bfn in bfns:
            gfn = self.by_bfn.pop(bfn, None)
            if gfn is not None:
                self.mapped.pop(gfn, None)
                self.lost.add(gfn)

    async def handle_ioreqs(self) -> None:
        """Drain the buffered ring and the synchronous requests: unmap, acknowledge, complete."""
        buffered, read_pointer, sync = await self.xc.ioreq_fetch(self.server)
        wanted = [r for r in buffered if r.type == IOREQ_TYPE_INVALIDATE]
        sync_wanted = [r for r in sync if r.type == IOREQ_TYPE_INVALIDATE]
        await self.unmap_bfns([r.data for r in wanted] + [r.data for r in sync_wanted])
        self.count(wanted, sync_wanted)
        if buffered:
            await self.xc.ioreq_ack(self.server, read_pointer)
        for req in sync:
            await self.xc.ioreq_complete(self.server, req.id)

    def count(self, buffered: list[BufferedRequest], sync: list[SyncRequest]) -> None:
        self.stats["buffered_invalidates"] += len(buffered)
        self.stats["sync_invalidates"] += len(sync)
        self.stats["unmapped_on_invalidate"] += len(buffered) + len(sync)

    async def events(self) -> None:
        while True:
            event = await self.xc.next_event()
            if event.get("event") == "ioreq" and event.get("ioserver") == self.server:
                await self.handle_ioreqs()

    async def work(self, bdf: str | None) -> None:
        """The device reads mapped pages; pages that came back are mapped again."""
        while True:
            await trio.sleep(self.args.remap_interval)
            if self.lost:
                self.stats["remapped"] += await self.map_pages(sorted(self.lost))
            if bdf and self.mapped:
                for gfn in list(self.mapped)[:8]:
                    bfn = self.mapped.get(gfn)
                    if bfn is None:
                        continue
                    dma = await self.xc.device_dma(bdf, bfn << 12, length=8)
                    self.stats["dma_ok" if dma["ok"] else "dma_faults"] += 1

    async def shutdown(self) -> None:
        await self.handle_ioreqs()
        await self.unmap_bfns(sorted(self.by_bfn))
        await self.xc.destroy_ioreq_server(self.server)


async def wait_for_stop(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

        async def on_stdin() -> None:
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

        async def on_file() -> None:
            while not args.until_file.exists():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        if args.until_file is not None:
            nursery.start_soon(on_file)
        if args.until_stdin_closes:
            nursery.start_soon(on_stdin)
        if args.duration is not None:
            await trio.sleep(args.duration)
            nursery.cancel_scope.cancel()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    args.guest = int(resolve(args.guest))
    async with await HypercallClient.connect(args.socket, resolve(args.token)) as xc:
        info = await xc.domain_info()
        bdf = args.bdf or (info["devices"][0] if info["devices"] else None)
        emulator = Emulator(xc, args)
        await emulator.start()
        ready = {
            "ready": True,
            "ioserver": emulator.server,
            "map_cap": emulator.map_cap,
            "mapped": len(emulator.mapped),
        }
        print(json.dumps(ready), flush=True)
        write_result(args.ready_file, ready)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(emulator.events)
            nursery.start_soon(emulator.work, bdf)
            await wait_for_stop(args)
            nursery.cancel_scope.cancel()
        await emulator.shutdown()
        return {
            "ok": True,
            "ioserver": emulator.server,
            "map_cap": emulator.map_cap,
            "still_mapped": len(emulator.by_bfn),
            **emulator.stats,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = trio.run(run, args)
    return report(args.result, summary)


if __name__ == "__main__":
    sys.exit(run_program(main))
