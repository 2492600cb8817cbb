#!/usr/bin/env python3
"""A PV-IOMMU-aware guest: map all of its memory 1:1 (BFN = PFN), prove DMA, unmap it all.

What a Linux guest's PV IOMMU driver does at boot, against xenemu:
  1. query_caps; without map_cap the guest has to fall back to bounce buffers, and stops.
  2. map every PFN at BFN = PFN, in batches (one IOTLB flush per batch).
  3. write a pattern into a spread of pages with the CPU, read it back through its device
     by DMA at the same bus addresses, then let the device write and the CPU read.
  4. unmap everything, and check that the device now faults.
Exit status 0 only when every check passed; ``--json`` prints a summary for programs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import resolve, run_program, write_result

from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient

PAGE = 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="the daemon's hypercall.sock")
    parser.add_argument("--token", required=True, help="this domain's token (xenemu token DOMID), or @FILE")
    parser.add_argument("--bdf", help="the device to DMA with (default: the domain's first)")
    parser.add_argument("--batch", type=int, default=512, help="ops per do_iommu_op call")
    parser.add_argument("--samples", type=int, default=64, help="pages checked by DMA")
    parser.add_argument("--json", action="store_true", help="print a JSON summary, no progress bars")
    parser.add_argument("--result", type=Path, help="also write the summary here (for a scenario's verdict)")
    return parser.parse_args(argv)


def pattern(gfn: int) -> bytes:
    return f"gfn {gfn:#x} says hello".encode()


async def run(args: argparse.Namespace) -> dict[str, object]:
    console = Console(stderr=True, quiet=args.json)
    summary: dict[str, object] = {"ok": False}
    async with await HypercallClient.connect(args.socket, resolve(args.token)) as xc:
        info = await xc.domain_info()
        pages, devices = info["pages"], info["devices"]
        bdf = args.bdf or (devices[0] if devices else None)
        summary.update(domid=info["domid"], pages=pages, bdf=bdf)
        (caps,) = await xc.iommu_op([ops.query_caps()])
        map_cap = bool(caps.flags & ops.MAP_CAP)
        summary.update(map_cap=map_cap, max_order=caps.order)
        console.print(f"d{info['domid']}: {pages} pages, device {bdf}, map_cap={map_cap}, max order {caps.order}")
        if not map_cap or bdf is None or info["type"] != "hvm":
            summary["error"] = "needs an HVM domain with an assigned device and map_cap"
            return summary

        started = time.perf_counter()
        failures = await batched(xc, console, "map", [ops.map_page(g, g) for g in range(pages)], args.batch)
        summary["map_failures"] = failures
        summary["map_seconds"] = round(time.perf_counter() - started, 3)

        step = max(pages // max(args.samples, 1), 1)
        sample = list(range(0, pages, step))[: args.samples]
        bad = 0
        for gfn in sample:
            await xc.guest_write(gfn, pattern(gfn))
            dma = await xc.device_dma(bdf, gfn * PAGE, length=len(pattern(gfn)))
            if not dma["ok"] or dma["data"] != pattern(gfn):
                bad += 1
            back = f"device wrote {gfn:#x}".encode()
            if (
                not (await xc.device_dma(bdf, gfn * PAGE + 2048, back))["ok"]
                or await xc.guest_read(gfn, len(back), offset=2048) != back
            ):
                bad += 1
        summary["dma_checked"] = len(sample)
        summary["dma_mismatches"] = bad
        console.print(f"DMA through the IOMMU: {len(sample)} pages checked, {bad} mismatches")

        failures = await batched(xc, console, "unmap", [ops.unmap_page(g) for g in range(pages)], args.batch)
        summary["unmap_failures"] = failures
        after = await xc.device_dma(bdf, 0, length=1)
        summary["faults_after_unmap"] = not after["ok"]
        console.print(f"after unmap, DMA to BFN 0 {'faults' if not after['ok'] else 'still succeeds'}")
        summary["ok"] = failures == 0 and summary["map_failures"] == 0 and bad == 0 and not after["ok"]
    return summary


async def batched(xc: HypercallClient, console: Console, label: str, batch: list[ops.Op], size: int) -> int:
    """Issue ``batch`` in calls of ``size`` ops with a progress bar; returns the failed ops."""
    failed = 0
    columns = (TextColumn(f"{label:>5}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(batch))
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            done = await xc.iommu_op(chunk)
            failed += sum(1 for op in done if op.status)
            progress.advance(task, len(chunk))
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = trio.run(run, args)
    write_result(args.result, summary)
    if args.json:
        print(json.dumps(summary))
    else:
        Console().print("[green]guest: all checks passed[/green]" if summary["ok"] else f"[red]guest: {summary}[/red]")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_program(main))
