#!/usr/bin/env python3
"""The toolstack's second job in the migration scenario: live-migrate a guest mid-way.

    migrator.py --dir /run/xenemu --domid @/run/xenemu/mig-guest.domid --to /run/xenemu-b \\
                --after /run/xenemu/results/guest-ready.json --delay 1.5 --result .../migration.json

Once the guest is up (``--after``) and has run ``--delay`` seconds, it runs the real CLI,
``xenemu --dir DIR migrate DOMID --to DST --json``, as an administrator would, and publishes its
report (rounds, pages sent, downtime) for the verdict; a migration that fails fails the result
with the CLI's one-line reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exchange import report, resolve, run_program


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the source daemon's state directory")
    parser.add_argument("--to", type=Path, required=True, help="the receiver's state directory")
    parser.add_argument("--domid", required=True, help="the domain to migrate, or @FILE")
    parser.add_argument("--after", help="wait for this file first (the guest's ready file)")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds to let the guest run first")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds the migration may take")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    domid = int(resolve(args.domid))
    if args.after:
        resolve("@" + args.after)
    time.sleep(args.delay)
    command = [sys.executable, "-m", "xenemu", "--dir", str(args.dir), "migrate", str(domid), "--to", str(args.to)]
    started = time.monotonic()
    run = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=args.timeout)
    if run.returncode != 0:
        reason = (run.stderr.strip() or run.stdout.strip() or f"exit {run.returncode}").splitlines()[-1]
        return report(args.result, {"ok": False, "error": reason[:300]})
    migration = json.loads(run.stdout)
    migration["cli_seconds"] = round(time.monotonic() - started, 3)
    return report(args.result, {"ok": True, "migration": migration})


if __name__ == "__main__":
    sys.exit(run_program(main))
