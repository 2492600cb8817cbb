"""A frontend and its backend meet through files in a shared directory (xenstore's stand-in)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def program_args(description: str | None) -> argparse.ArgumentParser:
    """The arguments every scenario program takes: the socket, its domain's token, a result file."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="the daemon's hypercall.sock")
    parser.add_argument("--token", required=True, help="this domain's token, or @FILE")
    parser.add_argument("--result", type=Path, help="also write the summary here (for a scenario's verdict)")
    return parser


def sector_data(sector: int) -> bytes:
    """What the grant pair's "disk" holds at ``sector``: both sides must agree on it."""
    return f"sector {sector:06d} ".encode() * 16


def publish(directory: Path, name: str, value: Any) -> None:
    """Write atomically, so the reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(value))
    os.replace(tmp, directory / name)


def wait_for(directory: Path, name: str, timeout: float = 120.0) -> Any:
    path = directory / name
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return json.loads(path.read_text())


def resolve(value: str, timeout: float = 120.0) -> str:
    """``@PATH`` is the contents of PATH (waited for), anything else is itself."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return path.read_text().strip()


def report(path: Path | None, summary: dict[str, Any]) -> int:
    """Publish a program's summary (for a verdict) and print it; its exit status."""
    write_result(path, summary)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


def write_result(path: Path | None, summary: Any) -> None:
    """A program's summary for the scenario's verdict (DIR/results/NAME.json)."""
    if path is not None:
        publish(path.parent, path.name, summary)
