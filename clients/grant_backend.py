#!/usr/bin/env python3
"""A block backend with a PV IOMMU: it maps the frontend's grants at bus addresses it picks.

It waits for the frontend's requests in ``--exchange DIR``, maps every grant in one batch with
``GNTMAP_device_map | GNTMAP_request_bfn_map`` at ``--bfn-base + i`` (read-only for writes),
lets its device DMA (reading write buffers, filling read buffers from its "disk"), checks that a
device write through a read-only grant faults, unmaps everything in one batch and publishes the
responses. Prints a JSON summary.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import program_args, publish, report, resolve, run_program, sector_data, wait_for

from xenemu.abi import grant_table as grants
from xenemu.abi.grant_table import UnmapGrant
from xenemu.client import SyncHypercallClient


def main(argv: list[str] | None = None) -> int:
    parser = program_args(__doc__)
    parser.add_argument("--exchange", type=Path, required=True)
    parser.add_argument("--bfn-base", type=lambda v: int(v, 0), default=0x40000)
    parser.add_argument("--bdf", help="the backend's device (default: its first)")
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {"ok": False, "errors": []}
    with SyncHypercallClient.connect(args.socket, resolve(args.token)) as xc:
        bdf = args.bdf or xc.domain_info()["devices"][0]
        job = wait_for(args.exchange, "requests.json")
        frontend, requests = job["frontend"], job["requests"]
        batch = [
            grants.map_at_bfn(frontend, r["ref"], args.bfn_base + i, readonly=r["op"] == "write")
            for i, r in enumerate(requests)
        ]
        mapped = xc.map_grant_refs(batch)
        responses = []
        read_only_faults = 0
        for i, (req, got) in enumerate(zip(requests, mapped, strict=True)):
            if got.status:
                responses.append({"id": req["id"], "status": got.status_name})
                continue
            addr = (args.bfn_base + i) << 12
            if req["op"] == "write":
                dma = xc.device_dma(bdf, addr, length=req["length"])
                read_only_faults += not xc.device_dma(bdf, addr, b"must not land")["ok"]
                responses.append(
                    {
                        "id": req["id"],
                        "status": "ok" if dma["ok"] else dma["reason"],
                        "sha256": hashlib.sha256(dma["data"]).hexdigest(),
                    }
                )
            else:
                dma = xc.device_dma(bdf, addr, sector_data(req["sector"]))
                responses.append({"id": req["id"], "status": "ok" if dma["ok"] else dma["reason"]})
        unmapped = xc.unmap_grant_refs([UnmapGrant(g.handle) for g in mapped if g.status == 0])
        summary["errors"] += [u.status_name for u in unmapped if u.status]
        writes = sum(1 for r in requests if r["op"] == "write")
        if read_only_faults != writes:
            summary["errors"].append(f"{writes - read_only_faults} device writes got through read-only grants")
        publish(args.exchange, "responses.json", {"responses": responses})
        summary.update(
            ok=not summary["errors"] and all(r["status"] == "ok" for r in responses),
            mapped=sum(1 for g in mapped if g.status == 0),
            read_only_faults=read_only_faults,
        )
    return report(args.result, summary)


if __name__ == "__main__":
    sys.exit(run_program(main))
