"""Output keeps every field: piped, a row is one line of whole fields; at an 80-column terminal
nothing is cut to an ellipsis. And a toolstack verb loads neither the server nor the core."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from tests.cli.kit import daemon, xenemu, xl
from tests.conformance.beds import DaemonProcess

__all__ = ["daemon"]

LONG_NAME = "a-guest-with-a-rather-long-name-that-does-not-fit"


def populate(daemon: DaemonProcess) -> None:
    xl(daemon, "create", "--name", LONG_NAME, "--pci", "00:03.0", "--pci", "00:04.0", "--pci", "0000:00:1f.7")


def test_piped_list_keeps_every_field(daemon: DaemonProcess) -> None:
    populate(daemon)
    run = xenemu("--dir", str(daemon.directory), "list", "--long")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    widths = {len(line.split()) for line in lines}
    assert widths == {15}, lines  # every row has every column, empty ones as "-"
    row = next(line for line in lines if line.startswith(LONG_NAME)).split()
    assert row[8] == "0000:00:03.0,0000:00:04.0,0000:00:1f.7"
    assert "…" not in run.out
    grep = subprocess.run(["grep", "1f.7"], input=run.out, capture_output=True, text=True, check=False)
    assert LONG_NAME in grep.stdout


def test_every_reading_verb_has_json(daemon: DaemonProcess) -> None:
    populate(daemon)
    for args in (
        ["list"],
        ["list", "--long"],
        ["info"],
        ["stats"],
        ["audit"],
        ["dmesg"],
        ["its"],
        ["its", "1"],
        ["mappings", "1"],
        ["token", "1"],
        ["vcpu-list"],
        ["create"],
        ["pci-attach", "2", "00:05.0"],
        ["mem-set", "2", "2"],
        ["destroy", "2"],
    ):
        run = xl(daemon, *args, "--json")
        assert run.code == 0, (args, run.err)
        json.loads(run.out)


def at_a_terminal(*args: str, columns: int = 80) -> str:
    """Run the CLI with its stdout on a pseudo-terminal ``columns`` wide; what it printed."""
    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS=str(columns), LINES="50", TERM="xterm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenemu", *args],
        stdout=follower,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode()


def test_an_80_column_terminal_loses_nothing(daemon: DaemonProcess) -> None:
    populate(daemon)
    for args in (["list"], ["list", "--long"], ["mappings", "1", "--limit", "4"]):
        text = at_a_terminal("--dir", str(daemon.directory), *args)
        assert "…" not in text and "..." not in text
        flat = "".join(text.split())
        assert LONG_NAME in flat or args[0] == "mappings"
    text = at_a_terminal("--dir", str(daemon.directory), "list", "--long")
    assert "0000:00:03.0,0000:00:04.0,0000:00:1f.7" in text
    boxed = at_a_terminal("--dir", str(daemon.directory), "list", columns=200)
    assert "┃" in boxed and LONG_NAME in boxed


def loaded_by_cli(*args: str) -> set[str]:
    code = (
        "import sys\n"
        "from xenemu.cli import main\n"
        f"sys.argv = ['xenemu', *{list(args)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return set(run.stderr.split())


#: What no toolstack verb needs: the hypervisor, the daemon, the bench, the daemon's logging.
HEAVY = ("xenemu.core.", "xenemu.server.", "xenemu.bench", "xenemu.logs", "structlog")


def heavy(loaded: set[str]) -> set[str]:
    allowed = {"xenemu.core.options", "xenemu.server.limits"}  # serve's flag defaults: dataclasses
    return {m for m in loaded if m.startswith(HEAVY) and m not in allowed}


def test_help_loads_no_client_server_or_core() -> None:
    for args in (["--help"], ["list", "--help"], ["create", "--help"], ["bench", "--help"], ["serve", "--help"]):
        loaded = loaded_by_cli(*args)
        assert "click" in loaded
        assert not heavy(loaded), (args, heavy(loaded))
        assert not {m for m in loaded if m.split(".")[0] in ("trio", "rich", "msgpack")}
        assert "xenemu.client" not in loaded


def test_a_toolstack_verb_loads_the_client_not_the_server_or_the_core(daemon: DaemonProcess, tmp_path: Path) -> None:
    populate(daemon)
    directory = str(daemon.directory)
    config = tmp_path / "g.cfg"
    config.write_text('name = "g"\nmemory = 1\npci = ["00:09.0"]\n')
    for args in (["list"], ["list", "--json"], ["info"], ["create", str(config)], ["destroy", "g"], ["dmesg"]):
        loaded = loaded_by_cli("--dir", directory, *args)
        assert "xenemu.client" in loaded, args
        assert not heavy(loaded), (args, heavy(loaded))
