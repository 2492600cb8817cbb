#!/usr/bin/env python3
"""A block-device-like frontend: it grants I/O buffers to its backend and checks the results.

Half the requests are writes (the buffer holds data for the disk; granted read-only) and half
are reads (the backend's device fills the buffer; granted writable). The frontend publishes the
requests in ``--exchange DIR``, waits for the backend's responses, checks every buffer, and
revokes every grant (which fails if the backend left one mapped). Prints a JSON summary.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import program_args, publish, report, resolve, run_program, sector_data, wait_for

from xenemu.client import SyncHypercallClient, XenError


def main(argv: list[str] | None = None) -> int:
    parser = program_args(__doc__)
    parser.add_argument("--backend", required=True, help="the backend's domid, or @FILE")
    parser.add_argument("--exchange", type=Path, required=True, help="directory shared with the backend")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--gfn-base", type=int, default=8)
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {"ok": False, "errors": []}
    args.backend = int(resolve(args.backend))
    with SyncHypercallClient.connect(args.socket, resolve(args.token)) as xc:
        requests = []
        for i in range(args.requests):
            gfn, op = args.gfn_base + i, "write" if i % 2 == 0 else "read"
            if op == "write":
                xc.guest_write(gfn, sector_data(1000 + i))
            else:
                xc.guest_write(gfn, b"\xee" * len(sector_data(0)))
            xc.grant_access(i, args.backend, gfn, readonly=op == "write")
            requests.append({"id": i, "ref": i, "op": op, "sector": 1000 + i, "length": len(sector_data(0))})
        publish(args.exchange, "requests.json", {"frontend": xc.domid, "requests": requests})
        responses = {r["id"]: r for r in wait_for(args.exchange, "responses.json")["responses"]}
        for req in requests:
            resp = responses.get(req["id"], {})
            gfn = args.gfn_base + req["id"]
            if resp.get("status") != "ok":
                summary["errors"].append(f"request {req['id']}: {resp}")
            elif req["op"] == "write":
                if resp.get("sha256") != hashlib.sha256(sector_data(req["sector"])).hexdigest():
                    summary["errors"].append(f"request {req['id']}: the backend read other data")
            elif xc.guest_read(gfn, req["length"]) != sector_data(req["sector"]):
                summary["errors"].append(f"request {req['id']}: the buffer does not hold the sector")
            try:
                xc.end_access(req["ref"])
            except XenError as exc:
                summary["errors"].append(f"grant {req['ref']} still mapped: {exc}")
        summary.update(ok=not summary["errors"], requests=len(requests), frontend=xc.domid)
    return report(args.result, summary)


if __name__ == "__main__":
    sys.exit(run_program(main))
