#!/usr/bin/env python3
"""The end of a scenario: wait for each program's result, run the audit, print the verdict.

Exit status 0 and ``VERDICT: PASS`` only if every expected result says ok and the audit is clean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import wait_for

from xenemu.client import SyncControlClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--expect", action="append", default=[], help="a result name (DIR/results/NAME.json)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    results = {name: wait_for(args.dir / "results", f"{name}.json", args.timeout) for name in args.expect}
    with SyncControlClient.connect(args.dir / "control.sock") as ctl:
        violations = ctl.audit()
        stats = ctl.stats()
    failed = sorted(name for name, result in results.items() if not result.get("ok"))
    passed = not failed and not violations
    print(
        json.dumps(
            {
                "scenario": args.scenario,
                "results": results,
                "audit": violations,
                "m2b_entries": stats["m2b_entries"],
                "free_frames": stats["free_frames"],
            }
        )
    )
    print(f"audit: {'clean' if not violations else f'{len(violations)} violations'}")
    print(
        f"VERDICT: {'PASS' if passed else 'FAIL'} ({args.scenario}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ")"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
