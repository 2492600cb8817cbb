#!/usr/bin/env python3
"""The toolstack job of a scenario: create its domains, assign devices, hand out tokens.

    toolstack.py --dir /run/xenemu --domain name=guest,type=hvm,memory=1024,device=00:03.0 \\
                                   --domain name=dm,type=pv,memory=16,device=00:05.0,target=guest

Each domain's id and token land in DIR/NAME.domid and DIR/NAME.token (mode 0600), where the
scenario's programs read them (``--token @DIR/NAME.token``). ``target`` names a domain created
earlier in the same call, or is a domid. Waits for the daemon's control socket first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from xenemu.client import ConnectionLost, SyncControlClient, XenError


def parse_domain(spec: str) -> dict[str, str]:
    fields = dict(part.split("=", 1) for part in spec.split(",") if part)
    if "name" not in fields:
        raise argparse.ArgumentTypeError(f"{spec!r}: name= is required")
    return fields


def wait_for_socket(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"toolstack: no daemon at {path} after {timeout} s")
        time.sleep(0.05)


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the daemon's socket directory")
    parser.add_argument("--domain", type=parse_domain, action="append", default=[])
    parser.add_argument("--dom0-device", action="append", default=[], help="assign a device to dom0")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--clean", action="store_true", help="first remove DIR/results and DIR/xs of a previous run")
    args = parser.parse_args(argv)
    control = args.dir / "control.sock"
    if args.clean:
        for sub in ("results", "xs"):
            shutil.rmtree(args.dir / sub, ignore_errors=True)
    wait_for_socket(control, args.timeout)
    created: dict[str, int] = {}
    report: list[dict[str, Any]] = []
    with SyncControlClient.connect(control) as ctl:
        for bdf in args.dom0_device:
            ctl.assign_device(0, bdf)
        for spec in args.domain:
            target = spec.get("target")
            target_id = None if target is None else created.get(target, int(target) if target.isdigit() else None)
            if target is not None and target_id is None:
                raise SystemExit(f"toolstack: unknown target {target!r}")
            reply = ctl.create_domain(
                spec.get("type", "hvm"),
                int(spec.get("memory", "256")),
                target_id,
                spec["name"],
                vcpus=int(spec.get("vcpus", "1")),
            )
            domid = reply["domid"]
            for bdf in filter(None, spec.get("device", "").split("+")):
                if "its" in spec:  # its=DEVICEID:EVENTS makes the device MSI-capable
                    devid, _, events = spec["its"].partition(":")
                    ctl.assign_device(domid, bdf, its_devid=int(devid, 0), its_events=int(events or "32", 0))
                else:
                    ctl.assign_device(domid, bdf)
            created[spec["name"]] = domid
            write_private(args.dir / f"{spec['name']}.token", reply["token"])
            (args.dir / f"{spec['name']}.domid").write_text(str(domid))
            report.append({"name": spec["name"], "domid": domid, "type": spec.get("type", "hvm")})
    print(json.dumps({"toolstack": "ok", "domains": report}), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, XenError, ConnectionLost) as exc:  # the daemon refused, or is not there
        sys.exit(f"toolstack: {type(exc).__name__}: {exc}")
