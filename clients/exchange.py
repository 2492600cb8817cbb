"""How a scenario's programs meet: files in the directory every service shares.

A frontend and its backend exchange requests there (xenstore's stand-in); every program leaves
its result there for the verdict, and holds a lease there while it runs, so the verdict learns
at once when a program died without one, whichever container it ran in.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
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


# -- leases: a program holds DIR/results/NAME.lock (flock) from its start to its death ------------
#: The descriptor of this process's lease: kept open (never closed) so the lock lives as long as
#: the process; the kernel lets it go however the process ends, SIGKILL included.
_LEASE: list[int] = []


def lease_path(result: Path) -> Path:
    return result.with_suffix(".lock")


def take_lease(result: Path) -> None:
    """Hold ``result``'s lease for the rest of this process's life.

    The lock file appears already locked (locked under a private name, then renamed), so a
    verdict never sees a lease that exists but is not yet held.
    """
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.parent / f".{result.stem}.{os.getpid()}.lock"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    os.replace(tmp, lease_path(result))
    _LEASE.append(fd)


def lease_state(result: Path) -> str:
    """``absent`` (not started yet), ``held`` (running) or ``released`` (the program ended)."""
    try:
        fd = os.open(lease_path(result), os.O_RDONLY)
    except FileNotFoundError:
        return "absent"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    finally:
        os.close(fd)
    return "released"


def lease_holder(result: Path) -> str:
    """Who held the lease, for a message: ``pid N on HOST``."""
    try:
        who = json.loads(lease_path(result).read_text())
        return f"pid {int(who['pid'])} on {str(who['host'])[:64]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as one bounded line: its type and message, never a traceback."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _result_arg(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--result" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--result="):
            return Path(arg.split("=", 1)[1])
    return None


def run_program(main: Callable[[], int]) -> int:
    """Run a scenario program so that its verdict always learns how it ended.

    With ``--result PATH`` the program holds PATH's lease while it runs; if it ends without
    writing a result (an exception, a usage error, an interrupt) a failed result with the reason
    is written for it. An exception is printed as one line on stderr, and the status is 1.
    """
    result = _result_arg(sys.argv[1:])
    prog = Path(sys.argv[0]).stem
    if result is not None:
        take_lease(result)
    error = ""
    try:
        status = main()
    except SystemExit as exc:  # argparse's usage errors, or a program's own exit
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(f"{prog}: {exc.code}", file=sys.stderr)
            error = str(exc.code)[:240]
    except KeyboardInterrupt:
        status, error = 130, "interrupted"
    except Exception as exc:
        status, error = 1, one_line(exc)
        print(f"{prog}: {error}", file=sys.stderr, flush=True)
    if result is not None and not result.exists():
        write_result(result, {"ok": False, "error": error or f"exited {status} without a result"})
    return status
