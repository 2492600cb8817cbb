#!/usr/bin/env python3
"""A balloon driver: give frames back to Xen and take them again, round after round.

Each round balloons out a run of GFNs in one ``decrease_reservation`` call (which waits while
an emulator answers synchronous invalidates), repopulates them with ``populate_physmap``, and
checks the fresh pages read back what it then writes. With ``--self-map`` it first maps the
GFNs in its own IOMMU context (as a PV-IOMMU guest would) and unmaps them only after the balloon
call, so the frames are held by its own mappings in between. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import report, resolve, run_program

from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--gfns", default="0:64", help="START:COUNT of GFNs to balloon")
    parser.add_argument("--chunk", type=int, default=64, help="GFNs per decrease_reservation call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--self-map", action="store_true", help="hold the frames in its own IOMMU context first")
    parser.add_argument("--self-map-base", type=lambda v: int(v, 0), default=0x100000)
    parser.add_argument("--result", type=Path, help="also write the summary here")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between rounds (emulators remap)")
    parser.add_argument("--after", help="wait for this file first (e.g. the emulator's ready file)")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.after:
        await trio.to_thread.run_sync(resolve, "@" + args.after)
    start, _, count = args.gfns.partition(":")
    gfns = list(range(int(start, 0), int(start, 0) + int(count or "1", 0)))
    summary: dict[str, Any] = {"ok": True, "rounds": 0, "ballooned": 0, "populated": 0, "waited": 0, "errors": []}
    async with await HypercallClient.connect(args.socket, resolve(args.token)) as xc:
        for round_no in range(args.rounds):
            for i in range(0, len(gfns), args.chunk):
                chunk = gfns[i : i + args.chunk]
                if args.self_map:
                    got = await xc.iommu_op([ops.map_page(args.self_map_base + g, g) for g in chunk])
                    if any(op.status for op in got):
                        summary["errors"].append(f"round {round_no}: self map {ops.statuses(got)[:4]}")
                out = await xc.decrease_reservation(chunk)
                summary["ballooned"] += out["ret"]
                summary["waited"] += out["waited"]
                if out["ret"] != len(chunk):
                    summary["errors"].append(f"round {round_no}: ballooned {out['ret']}/{len(chunk)}: {out['status']}")
                if args.self_map:
                    await xc.iommu_op([ops.unmap_page(args.self_map_base + g) for g in chunk])
                back = await xc.populate_physmap(chunk)
                summary["populated"] += back["ret"]
                if back["ret"] != len(chunk):
                    summary["errors"].append(
                        f"round {round_no}: populated {back['ret']}/{len(chunk)}: {back['status']}"
                    )
                for g in chunk[:4]:
                    note = f"round {round_no} gfn {g}".encode()
                    if await xc.guest_read(g, 16) != bytes(16):
                        summary["errors"].append(f"gfn {g}: a repopulated page was not zeroed")
                    await xc.guest_write(g, note)
                    if await xc.guest_read(g, len(note)) != note:
                        summary["errors"].append(f"gfn {g}: read back differs")
            summary["rounds"] += 1
            if args.pause and round_no + 1 < args.rounds:
                await trio.sleep(args.pause)
    summary["ok"] = not summary["errors"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = trio.run(run, args)
    return report(args.result, summary)


if __name__ == "__main__":
    sys.exit(run_program(main))
