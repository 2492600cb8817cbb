"""The state directory is the daemon's own (issue item 6).

``--dir`` is created 0700; one that someone else owns or may write to, or that is not a real
directory, is refused with one line and exit code 2; the sockets get their modes without a
chmod of any path; and a second daemon on a directory a live one holds is refused.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adversarial.shell_kit import attacked, wait_for
from xenemu.client import SyncControlClient, SyncHypercallClient


def serve(directory: Path, *flags: str, code: str = "") -> subprocess.Popen[str]:
    """``xenemu --dir DIRECTORY serve``, with ``code`` run first in the daemon's interpreter."""
    program = f"{code}\nimport sys\nfrom xenemu.cli import main\nsys.argv[0] = 'xenemu'\nmain()"
    return subprocess.Popen(
        [sys.executable, "-c", program, "--dir", str(directory), "serve", "--log-level", "warning", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def refused(directory: Path, *, sockets: bool = False) -> str:
    """Run serve on ``directory``; it must refuse: exit 2, one line, no traceback, no socket
    (but those already there, with ``sockets``)."""
    proc = serve(directory)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"xenemu served {directory}") from None
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("xenemu: "), err
    if directory.is_dir() and not directory.is_symlink() and not sockets:
        assert not list(directory.glob("*.sock"))
    return err.strip()


def test_a_new_state_directory_is_created_0700(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "run"
    proc = serve(directory)
    try:
        wait_for(lambda: (directory / "hypercall.sock").exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        with SyncControlClient.connect(directory / "control.sock") as ctl:
            assert ctl.audit() == []
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777, 0o775], ids=["group-rwx", "other-rwx", "sticky-tmp", "group-w"])
def test_a_directory_others_may_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    assert "writable by group or others" in refused(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory someone else's needs root")
def test_a_directory_someone_else_owns_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    os.chown(directory, 12345, 12345)
    assert "owned by uid 12345" in refused(directory)


def test_a_symlink_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    """Whoever owns the link could point it elsewhere later: only a real directory will do."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(real)
    assert "is not a directory of this user's" in refused(link)
    assert not list(real.iterdir())


#: Records every chmod of a path (not of a descriptor) the daemon makes, and every umask change.
AUDIT = """
import os, sys
_log = open(os.environ["XENEMU_TEST_AUDIT"], "a", buffering=1)
def _hook(event, args):
    if event == "os.chmod" and not isinstance(args[0], int):
        _log.write(f"chmod {args[0]}\\n")
sys.addaudithook(_hook)
os.umask(0o077)
"""


def test_sockets_get_their_modes_without_a_chmod_of_any_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "audit.txt"
    record.write_text("")
    monkeypatch.setenv("XENEMU_TEST_AUDIT", str(record))
    directory = tmp_path / "run"
    proc = serve(directory, code=AUDIT)
    try:
        wait_for(lambda: (directory / "hypercall.sock").exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        # modes as specified whatever the umask (0o077 here), and nothing left of the binding
        assert record.read_text() == ""
        assert stat.S_IMODE(os.lstat(directory / "control.sock").st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(directory / "hypercall.sock").st_mode) == 0o666
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # no staging left
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert record.read_text() == ""


def test_a_second_daemon_on_a_live_directory_is_refused(tmp_path: Path) -> None:
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        token = ctl.create_domain("hvm", 16)["token"]
        before = os.stat(daemon.hypercall_path).st_ino
        assert f"another xenemu daemon (pid {daemon.proc.pid}) serves" in refused(daemon.directory, sockets=True)
        assert os.stat(daemon.hypercall_path).st_ino == before  # the first daemon's sockets, untouched
        with SyncHypercallClient.connect(daemon.hypercall_path, token) as xc:
            assert xc.echo(b"still mine") == b"still mine"
        assert ctl.audit() == []
