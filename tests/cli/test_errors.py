"""Every error is one line on stderr, never a traceback, with xl's exit codes: 0 done, 1 refused
by the daemon (or no daemon), 2 a wrong command line."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.cli.kit import Run, daemon, xenemu, xl
from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient, XenError

__all__ = ["daemon"]


def one_line(run: Run, code: int, *words: str) -> None:
    assert run.code == code, (run.code, run.out, run.err)
    assert "Traceback" not in run.err + run.out
    assert len(run.err.strip().splitlines()) == 1, run.err
    assert run.err.startswith("xenemu: ")
    for word in words:
        assert word in run.err, run.err


def test_refusals_exit_1(daemon: DaemonProcess) -> None:
    one_line(xl(daemon, "destroy", "0"), 1, "EPERM")
    one_line(xl(daemon, "pci-attach", "77", "00:03.0"), 1, "ESRCH")
    one_line(xl(daemon, "destroy", "nobody"), 1, "no domain named 'nobody'")
    one_line(xl(daemon, "list", "nobody"), 1, "nobody")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("pci-attach", "0", "00:20.0"), ("device 20 is out of range",)),
        (("pci-attach", "0", "00:03.8"), ("not a PCI address",)),
        (("pci-attach", "0", "00:03.0", "--rmrr", "zz"), ("START[:COUNT]",)),
        (("pci-attach", "0", "00:03.0", "--rmrr", "0x10:0"), ("COUNT >= 1",)),
        (("create", "--memory", "0"), ("more than 0",)),
        (("create", "--memory", "-4"), ("not a size",)),
        (("create", "--frames", "0"), ("out of range",)),
        (("create", "--memory", "3k"), ("4 KiB frames",)),
        (("create", "--vcpus", "0"), ("out of range",)),
        (("create", "--pin", "a,b"), ("--pin",)),
        (("mappings", "0", "--start", "-1"), ("out of range",)),
        (("mappings", "0", "--limit", "0"), ("out of range",)),
        (("mappings", "0", "--limit", "100000"), ("out of range",)),
        (("mappings", "0", "--start", "zz"), ("not an integer",)),
        (("mem-set", "0", "0"), ("more than 0",)),
        (("dmesg", "-n", "0"), ("out of range",)),
        (("serve", "--frames", "0"), ("out of range",)),
        (("serve", "--dom0-memory", "-1"), ("out of range",)),
        (("serve", "--its-rate", "0"), ("--its-rate",)),
        (("serve", "--frames", "100", "--dom0-memory", "200"), ("nr_frames too small",)),
        (("demo", "--frames", "0"), ("out of range",)),
        (("bench", "--plot", "/no/such/dir/x.png"), ("not a directory",)),
        (("list", "--bogus"), ("No such option",)),
        (("frobnicate",), ("No such command",)),
    ],
)
def test_usage_errors_exit_2(daemon: DaemonProcess, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    one_line(xl(daemon, *args), 2, *words)


def test_the_core_refuses_a_device_number_past_1f(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        with pytest.raises(XenError) as refused:
            ctl.assign_device(0, "0000:00:20.0")
        assert refused.value.errno == 22
        assert ctl.assign_device(0, "0000:00:1f.7")["bdf"] == "0000:00:1f.7"


def test_bad_config_files_name_the_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nmemory = [1,\nvcpus = 2\n')
    one_line(xl(daemon, "create", str(bad)), 2, "bad.cfg:3:")
    bad.write_text('name = "x"\n\nmemory 3\n')
    one_line(xl(daemon, "create", str(bad)), 2, "bad.cfg:3:", "expected '='")
    bad.write_text('name = "unterminated\n')
    one_line(xl(daemon, "create", str(bad)), 2, "bad.cfg:1:")
    bad.write_text("memory = 0\n")
    one_line(xl(daemon, "create", str(bad)), 2, "memory")
    bad.write_text('pci = ["00:20.0"]\n')
    one_line(xl(daemon, "create", str(bad)), 2, "out of range")
    bad.write_bytes(b"name = '\xff'\n")
    one_line(xl(daemon, "create", str(bad)), 2, "cannot read")
    one_line(xl(daemon, "create", str(tmp_path / "missing.cfg")), 2, "cannot read")
    assert [d["domid"] for d in SyncControlClient.connect(daemon.control_path).list_domains()] == [0]


def test_bad_dirs(tmp_path: Path) -> None:
    one_line(xl(tmp_path / "missing", "list"), 1, "no xenemu daemon", "does not exist")
    one_line(xl(tmp_path, "list"), 1, "no xenemu daemon")
    one_line(xl(tmp_path / ("a" * 120), "list"), 2, "too long", "107")
    afile = tmp_path / "file"
    afile.write_text("")
    one_line(xl(afile, "list"), 2, "is a file")
    one_line(xenemu("--dir", str(tmp_path / ("b" * 120)), "serve"), 2, "too long")
    one_line(xenemu("--dir", "/proc/no-such-dir", "serve"), 2, "cannot use --dir")
    not_ours = tmp_path / "open"
    not_ours.mkdir(mode=0o777)
    not_ours.chmod(0o777)
    one_line(xenemu("--dir", str(not_ours), "serve"), 2)
    # a socket nobody listens on
    (tmp_path / "stale").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "stale" / "control.sock"))
    listener.close()
    one_line(xl(tmp_path / "stale", "list"), 1, "no xenemu daemon")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may connect to any socket")
def test_no_permission_on_the_control_socket(daemon: DaemonProcess) -> None:
    daemon.control_path.chmod(0)
    one_line(xl(daemon, "list"), 1, "permission denied")


def test_permission_denied_is_one_line_whoever_runs_it(tmp_path: Path) -> None:
    """What a user without access sees, made for root too: a connect that raises EACCES."""
    code = (
        "import socket, sys\n"
        "def refuse(self, *a):\n"
        "    raise PermissionError(13, 'Permission denied')\n"
        "socket.socket.connect = refuse\n"
        "from xenemu.cli import main\n"
        f"sys.argv = ['xenemu', '--dir', {str(tmp_path)!r}, 'list']\n"
        "main()\n"
    )
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    one_line(Run(run.returncode, run.stdout, run.stderr), 1, "permission denied")


def test_demo_refuses_zero_memory() -> None:
    run = xenemu("demo", "--memory", "0")
    one_line(run, 2, "more than 0")
    assert "all checks passed" not in run.out


def test_bench_checks_compare_before_running(tmp_path: Path) -> None:
    one_line(xenemu("bench", "--quick", "--compare", "no-such-revision-xyz", timeout=30), 2, "not a revision")
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    one_line(xenemu("bench", "--quick", "--compare", str(junk), timeout=30), 2, "not a bench result")
    one_line(xenemu("bench", "--quick", "--out", str(tmp_path / "no" / "x.json"), timeout=30), 2, "not a directory")
