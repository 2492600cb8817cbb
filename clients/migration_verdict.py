#!/usr/bin/env python3
"""The migration scenario's verdict: nothing the guest was told was done is lost on the way.

It waits for the guest's and the migrator's results as ``verdict.py`` does (a program that died
or said not ok fails the scenario at once), then checks, and prints ``VERDICT: PASS (migration)``
with status 0 only if all of these hold (else ``VERDICT: FAIL: REASONS`` and status 1):

* **the domain moved**: the source has no domain but dom0; the receiver has one domain with the
  guest's token, its name, and as many pages as the migrator's report says;
* **no acknowledged byte lost**: read back on the receiver with the guest's token, every slot
  of the guest's ledger holds exactly the record of the last write to it whose reply said it was
  done (CPU or DMA; a write that got an error reply was not done, so neither a later unacked
  write nor an older one may show), and each slot it never wrote holds zeros;
* **each acknowledged MSI delivered exactly once**: an MSI is *acknowledged as sent* when its
  device's doorbell write (``device_dma`` to GITS_TRANSLATER) got a reply saying ok. The device
  raises an event again only after the guest took the previous LPI of that event, so coalescing
  is never legitimate: every acknowledged MSI must have been taken as exactly one ``lpi`` event,
  on the source or the receiver (0: lost; 2 or more: doubled), and no LPI may have been taken
  with no acknowledged MSI of its event outstanding (doubled, too);
* **both audits clean**, on the source daemon and on the receiver.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import one_line, resolve
from migrating_guest import RECORD, SLOTS, record
from verdict import DAEMON_TIMEOUT, Stopped, Waiter, audit

from xenemu.client import SyncControlClient, SyncHypercallClient


def lost_bytes(xc: SyncHypercallClient, guest: dict[str, Any]) -> tuple[int, int, list[str]]:
    """(slots checked, bytes that differ, examples): every data page read back on the receiver."""
    ledger = {int(k): v for k, v in guest["ledger"].items()}
    differing, examples = 0, []
    zero = bytes(RECORD)
    for gfn in range(guest["data_gfn"], guest["data_gfn"] + guest["pages"]):
        page = xc.guest_read(gfn, 4096)
        for slot in range(SLOTS):
            seq = ledger.get(gfn * SLOTS + slot)
            want = zero if seq is None else record(seq, gfn, slot)
            got = page[slot * RECORD : (slot + 1) * RECORD]
            if got != want:
                bad = sum(1 for a, b in zip(got, want, strict=True) if a != b)
                differing += bad
                if len(examples) < 3:
                    seen = int.from_bytes(got[:8], "little")
                    examples.append(f"GFN {gfn:#x} slot {slot}: write {seq} acknowledged, holds {seen} ({bad} bytes)")
    return len(ledger), differing, examples


def msi_check(guest: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    msis = guest["msis"]
    taken = Counter(m["taken"] for m in msis)
    lost = [m for m in msis if m["taken"] == 0]
    doubled = [m for m in msis if m["taken"] > 1]
    unexpected = guest["unexpected"]
    figures = {
        "acknowledged": len(msis),
        "sent_on": dict(Counter(m["sent_on"] for m in msis)),
        "taken_on": dict(Counter(m.get("taken_on", "never") for m in msis)),
        "sent_on_source_taken_on_receiver": sum(1 for m in msis if m["sent_on"] != m.get("taken_on", m["sent_on"])),
        "in_service_across_the_move": guest["lpis_in_service_across_the_move"],
        "taken_counts": {str(k): v for k, v in sorted(taken.items())},
        "lost": len(lost),
        "doubled": len(doubled) + len(unexpected),
    }
    errors = []
    if lost:
        first = lost[0]
        errors.append(
            f"{len(lost)} acknowledged MSIs never delivered"
            f" (first: event {first['event']}, sent on the {first['sent_on']})"
        )
    if doubled or unexpected:
        what = [f"event {m['event']} taken {m['taken']} times" for m in doubled[:2]]
        what += [f"INTID {u['intid']} taken on the {u['taken_on']} with no MSI outstanding" for u in unexpected[:2]]
        errors.append(f"{len(doubled) + len(unexpected)} LPIs doubled ({'; '.join(what)})")
    if not msis:
        errors.append("no MSI was acknowledged: the scenario proved nothing about LPIs")
    return figures, errors


def domain_moved(
    source: Path, receiver: Path, token: str, migration: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    errors = []
    with SyncControlClient.connect(source / "control.sock") as ctl:
        left = [d["domid"] for d in ctl.list_domains() if d["domid"] != 0]
    if left:
        errors.append(f"the source still has domains {left}")
    with SyncHypercallClient.connect(receiver / "hypercall.sock", token) as xc:
        info = xc.domain_info()
    if info["domid"] != migration["new_domid"] or info["pages"] != migration["pages"]:
        errors.append(f"the receiver's domain is d{info['domid']} with {info['pages']} pages, not the report's")
    return {"domid": info["domid"], "pages": info["pages"]}, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the source daemon's directory (and results/)")
    parser.add_argument("--receiver", type=Path, required=True, help="the receiving daemon's directory")
    parser.add_argument("--token", required=True, help="the guest's token, or @FILE")
    parser.add_argument("--guest", default="guest", help="the guest's result name")
    parser.add_argument("--migration", default="migration", help="the migrator's result name")
    parser.add_argument("--start-timeout", type=float, default=60)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(DAEMON_TIMEOUT)
    import verdict

    waiter = Waiter(args.dir, [args.guest, args.migration], args.start_timeout, args.timeout)
    try:
        verdict._ARMED = True
        if verdict._EARLY:
            raise Stopped(verdict._EARLY[0])
        waiter.run()
    except Stopped as exc:
        waiter.failures.append(f"stopped by {exc} while waiting for {', '.join(waiter.pending()) or 'nothing'}")
    finally:
        waiter.close()
    summary: dict[str, Any] = {"scenario": "migration", "missing": waiter.pending()}
    failures = list(waiter.failures)
    if not failures:
        guest, migration = waiter.results[args.guest], waiter.results[args.migration]["migration"]
        summary["migration"] = {k: migration[k] for k in ("rounds", "pages", "pages_sent", "downtime_ms", "total_s")}
        summary["guest"] = {k: guest[k] for k in ("writes", "busy_retries", "reconnects", "where", "seconds")}
        try:
            token = resolve(args.token)
            summary["receiver_domain"], errors = domain_moved(args.dir, args.receiver, token, migration)
            failures += errors
            with SyncHypercallClient.connect(args.receiver / "hypercall.sock", token) as xc:
                slots, differing, examples = lost_bytes(xc, guest)
            summary["bytes"] = {"slots_written": slots, "bytes_lost": differing}
            if differing:
                failures.append(f"{differing} acknowledged bytes lost or wrong ({'; '.join(examples)})")
            summary["msis"], errors = msi_check(guest)
            failures += errors
        except Exception as exc:
            failures.append(f"the check could not run: {one_line(exc)}")
    audits: dict[str, Any] = {}
    for side, directory in (("source", args.dir), ("receiver", args.receiver)):
        violations, _stats, gone = audit(directory / "control.sock")
        audits[side] = "not run" if violations is None else len(violations)
        if gone:
            failures.append(f"{side}: {gone}")
        elif violations:
            failures.append(f"{side} audit: {len(violations)} violations, first: {violations[0][:200]}")
    summary["audit"] = audits
    print(json.dumps(summary))
    if all(n == 0 for n in audits.values()):
        print("audit: clean (source and receiver)")
    else:
        print("audit: " + ", ".join(f"{side} {'clean' if n == 0 else f'{n} violations'}" for side, n in audits.items()))
    if failures:
        print(f"VERDICT: FAIL: {'; '.join(failures)} (migration)", flush=True)
        return 1
    print("VERDICT: PASS (migration)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
