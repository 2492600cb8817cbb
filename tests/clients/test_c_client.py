"""The C library (clients/c): built, installed and embedded as other people's programs would.

A C program and a C++ program link the *installed* library through ``pkg-config --cflags
--libs xenemu`` (the shared one and the static one) and run against a real daemon, which is
killed under them; the example program exercises each hypercall family.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient, SyncHypercallClient

C_DIR = Path(__file__).resolve().parents[2] / "clients" / "c"
HOST_PROGRAM = Path(__file__).resolve().parent / "c" / "host_program.c"
PREFIX = "/opt/xenemu"
pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("make", "gcc", "g++")), reason="no C/C++ toolchain"
)


def pkg_config() -> str:
    """The venv's pkg-config (the ``pkgconf`` wheel of the test extra), else the system's."""
    mine = Path(sys.executable).parent / "pkg-config"
    found = str(mine) if mine.exists() else shutil.which("pkg-config")
    assert found, "pkg-config: install the test extra (pip install -e '.[test]')"
    return found


@dataclass
class Installed:
    build: Path
    root: Path  # DESTDIR
    env: dict[str, str]

    @property
    def libdir(self) -> Path:
        return self.root / PREFIX.lstrip("/") / "lib"

    def flags(self, *args: str) -> list[str]:
        out = subprocess.run([pkg_config(), *args, "xenemu"], env=self.env, capture_output=True, text=True, check=True)
        return out.stdout.split()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """``make install`` into a staging DESTDIR, with CFLAGS given on the command line."""
    build, root = tmp_path_factory.mktemp("cbuild"), tmp_path_factory.mktemp("destdir")
    make = ["make", "-C", str(C_DIR), f"BUILD={build}", f"PREFIX={PREFIX}", "CFLAGS=-O1 -g0"]
    subprocess.run([*make, "all"], check=True, capture_output=True)
    subprocess.run([*make, f"DESTDIR={root}", "install"], check=True, capture_output=True)
    env = dict(
        os.environ,
        PKG_CONFIG_PATH=str(root / PREFIX.lstrip("/") / "lib" / "pkgconfig"),
        PKG_CONFIG_SYSROOT_DIR=str(root),
    )
    return Installed(build, root, env)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "512")
    yield proc
    proc.stop()


def test_make_install_lays_out_a_library_people_can_link(installed: Installed) -> None:
    lib = installed.libdir
    assert (lib / "libxenemu.a").is_file() and (lib / "libxenemu.so.0.2.0").is_file()
    assert os.readlink(lib / "libxenemu.so") == "libxenemu.so.0.2.0"
    assert os.readlink(lib / "libxenemu.so.0") == "libxenemu.so.0.2.0"
    headers = {p.name for p in (installed.root / PREFIX.lstrip("/") / "include" / "xenemu").iterdir()}
    assert {"xenemu.h", "pv_iommu.h", "ioreq.h", "grant_table.h", "gic_its.h"} <= headers
    soname = subprocess.run(["objdump", "-p", str(lib / "libxenemu.so.0.2.0")], capture_output=True, text=True)
    assert "SONAME               libxenemu.so.0" in soname.stdout
    pc = (lib / "pkgconfig" / "xenemu.pc").read_text()
    assert f"prefix={PREFIX}\n" in pc and "Libs: -L${libdir} -lxenemu" in pc
    assert installed.flags("--cflags") == [f"-I{installed.root}{PREFIX}/include"]
    assert installed.flags("--libs") == [f"-L{installed.root}{PREFIX}/lib", "-lxenemu"]
    # the command line's CFLAGS changed the optimisation, not the include paths
    log = subprocess.run(
        ["make", "-C", str(C_DIR), f"BUILD={installed.build}", "CFLAGS=-O0", "-B", "-n"], capture_output=True, text=True
    )
    assert "-O0" in log.stdout and f"-I{C_DIR.parent.parent / 'abi'}" in log.stdout


def build_host_program(installed: Installed, out: Path, cxx: bool) -> Path:
    if cxx:  # C++, against the static library: -Wl,-Bstatic around pkg-config's -l
        cmd = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-x", "c++", str(HOST_PROGRAM), "-x", "none"]
        cmd += installed.flags("--cflags")
        libs = installed.flags("--libs")
        cmd += [f for f in libs if f.startswith("-L")] + ["-Wl,-Bstatic", "-lxenemu", "-Wl,-Bdynamic"]
    else:
        cmd = [
            "gcc",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            str(HOST_PROGRAM),
            *installed.flags("--cflags", "--libs"),
        ]
    subprocess.run([*cmd, "-o", str(out)], check=True, capture_output=True, text=True)
    return out


@pytest.mark.parametrize("cxx", [False, True], ids=["c-shared", "cxx-static"])
def test_a_host_program_links_the_installed_library_and_survives_the_daemon(
    installed: Installed, daemon: DaemonProcess, tmp_path: Path, cxx: bool
) -> None:
    program = build_host_program(installed, tmp_path / "host", cxx)
    needed = subprocess.run(["objdump", "-p", str(program)], capture_output=True, text=True).stdout
    assert ("NEEDED               libxenemu.so.0" in needed) is not cxx
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 256)
        ctl.assign_device(guest["domid"], "00:03.0")
    env = dict(os.environ, LD_LIBRARY_PATH=str(installed.libdir))
    proc = subprocess.Popen(
        [str(program), str(daemon.hypercall_path), guest["token"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdin is not None
    lines = []
    while not lines or lines[-1] not in ("READY", ""):
        lines.append(proc.stdout.readline().strip())
    assert lines[-1] == "READY", lines
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    out, err = proc.communicate("go\n", timeout=60)
    text = "\n".join(lines) + "\n" + out
    assert proc.returncode == 0, (proc.returncode, text, err)  # a SIGPIPE would have killed it (-13)
    assert err == "", err  # the library prints nothing of its own
    assert f"lang={'c++' if cxx else 'c'} version=0.2.0" in text
    assert "open long path: NULL errno=ENAMETOOLONG" in text
    assert "open bad token: NULL errno=EACCES code=1 detail=[hello: EACCES: " in text
    assert f"open: d{guest['domid']} fd=ok" in text
    assert "query_caps: rc=0 status=0 map_cap=1" in text
    oversized = "oversized batch: rc=-1 errno=E2BIG code=Invalid configuration detail=[iommu_op: E2BIG ("
    assert oversized in text
    assert "cleared: code=0 detail=[]" in text
    assert "grant_access: rc=0 end=0 out of range: rc=-1 errno=EINVAL" in text
    assert "guest memory: write=0 read=0 same=1" in text
    stopped = (
        "balloon: out=3 again=0 errno=ENOENT detail=[decrease_reservation: stopped after 0 of 3 GFNs: ENOENT] in=3"
    )
    assert stopped in text
    died = next(line for line in text.splitlines() if line.startswith("after the daemon died"))
    assert died.startswith(
        ("after the daemon died: rc=-1 errno=EPIPE", "after the daemon died: rc=-1 errno=ECONNRESET")
    )
    assert "connection lost" in died
    assert "again: rc=-1" in text and "wait: rc=-1" in text and text.rstrip().endswith("ALIVE")


def test_example_map_query_caps_and_batched_map_unmap(installed: Installed, daemon: DaemonProcess) -> None:
    example = installed.build / "xenemu-example"
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 256)
        ctl.assign_device(guest["domid"], "00:03.0")
        run = subprocess.run(
            [str(example), str(daemon.hypercall_path), guest["token"], "map", "256"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"connected as d{guest['domid']}" in run.stdout
        assert "map_cap=1 order=18" in run.stdout
        assert "map_page x256: rc=0 failed=0" in run.stdout and "unmap_page x256: rc=0 failed=0" in run.stdout
        flushes = next(d for d in ctl.list_domains() if d["domid"] == guest["domid"])["flushes"]
        assert flushes == {"added": 1, "modified": 1}
        assert ctl.audit() == []
        bad = subprocess.run(
            [str(example), str(daemon.hypercall_path), "f" * 32, "map"], capture_output=True, text=True, timeout=60
        )
        assert bad.returncode == 1 and "xc_interface_open: hello: EACCES: bad token" in bad.stderr, bad.stderr
        assert "(errno 13, Internal error)" in bad.stderr


def test_example_emulator_reads_pushed_invalidates(installed: Installed, daemon: DaemonProcess) -> None:
    example = installed.build / "xenemu-example"
    pages = 520  # more than the 511-slot ring: the last ones arrive as synchronous requests
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 600)
        dm = ctl.create_domain("pv", 16, target=guest["domid"])
        ctl.assign_device(dm["domid"], "00:05.0")
        proc = subprocess.Popen(
            [str(example), str(daemon.hypercall_path), dm["token"], "emulate", str(guest["domid"]), str(pages)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[1].startswith("READY"), lines
        with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            done = xc.decrease_reservation(list(range(pages)))
        assert done["ret"] == pages and done["waited"] == pages - 511
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        assert out.count("INVALIDATE") == pages and f"DONE invalidated={pages} failed=0 destroy=0" in out
        assert ctl.stats()["m2b_entries"] == 0
        assert ctl.audit() == []


def test_example_grants_map_at_chosen_bfns(installed: Installed, daemon: DaemonProcess) -> None:
    example = installed.build / "xenemu-example"
    with SyncControlClient.connect(daemon.control_path) as ctl:
        front = ctl.create_domain("hvm", 64)
        back = ctl.create_domain("hvm", 64)
        ctl.assign_device(back["domid"], "00:04.0")
        run = subprocess.run(
            [str(example), str(daemon.hypercall_path), front["token"], "grant", back["token"], "32"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "map_grant_ref x32: mapped=32 first_bfn=0x30000" in run.stdout
        assert "end_access while mapped: EBUSY" in run.stdout
        assert "unmap_grant_ref x32: unmapped=32 ended=32" in run.stdout
        assert ctl.audit() == []


def test_example_its_brings_up_the_vits_and_takes_each_msi(installed: Installed, daemon: DaemonProcess) -> None:
    example = installed.build / "xenemu-example"
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 1024)
        assigned = ctl.assign_device(guest["domid"], "00:06.0", its_devid=0x30, its_events=8, pits=0)
        assert assigned["vdevid"] == 0
        with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            its_base = xc.domain_info()["its"]["frames"]["0"]
        run = subprocess.run(
            [str(example), str(daemon.hypercall_path), guest["token"], "its", "00:06.0", "8", hex(its_base)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "ITS up: 8 events mapped to LPIs 8224..8231" in run.stdout
        assert [line for line in run.stdout.splitlines() if line.startswith("LPI")] == [
            f"LPI vcpu=0 intid={8224 + e}" for e in range(8)
        ]
        assert "DONE lpis=8 of 8" in run.stdout
        assert ctl.audit() == []
