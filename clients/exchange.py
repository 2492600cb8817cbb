"""A frontend and its backend meet through files in a shared directory (xenstore's stand-in)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


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


def write_result(path: Path | None, summary: Any) -> None:
    """A program's summary for the scenario's verdict (DIR/results/NAME.json)."""
    if path is not None:
        publish(path.parent, path.name, summary)
