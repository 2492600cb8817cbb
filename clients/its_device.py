#!/usr/bin/env python3
"""A device that raises MSIs: 4-byte DMA writes of EventIDs to its vITS doorbell (GITS_TRANSLATER).

It speaks for the domain the device is assigned to (its token) and writes through the device's
IOMMU context, as a real device's MSI write goes through the IOMMU. Events go round-robin over
``--events`` at ``--rate`` per second, ``--count`` in all; the summary says how many of each.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import program_args, report, resolve, run_program

from xenemu.client import SyncHypercallClient

TRANSLATER = 0x10040


def main(argv: list[str] | None = None) -> int:
    parser = program_args(__doc__)
    parser.add_argument("--bdf", help="the device (default: the domain's first MSI-capable one)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="MSIs per second")
    parser.add_argument("--after", help="wait for this file first (the driver's ready file)")
    args = parser.parse_args(argv)
    if args.after:
        resolve("@" + args.after)
    sent: Counter[int] = Counter()
    with SyncHypercallClient.connect(args.socket, resolve(args.token)) as xc:
        its = xc.domain_info()["its"]
        device = next(d for d in its["devices"] if args.bdf in (None, d["bdf"]))
        doorbell = its["frames"][str(device["pits"])] + TRANSLATER
        started = time.monotonic()
        faults = 0
        for i in range(args.count):
            event = i % device["events"]
            if not xc.device_dma(device["bdf"], doorbell, event.to_bytes(4, "little"))["ok"]:
                faults += 1
            sent[event] += 1
            delay = started + (i + 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        elapsed = time.monotonic() - started
    summary = {
        "ok": faults == 0,
        "sent": args.count,
        "faults": faults,
        "msis_per_s": round(args.count / elapsed),
        "device": device["bdf"],
        "vdevid": device["vdevid"],
        "sent_per_event": {str(k): v for k, v in sorted(sent.items())},
    }
    return report(args.result, summary)


if __name__ == "__main__":
    sys.exit(run_program(main))
