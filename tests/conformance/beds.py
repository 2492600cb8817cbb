"""Two beds with one interface: the pure core in-process, and any daemon over its sockets.

The conformance cases are written against this interface only, so the same case checks the
core directly and checks a daemon (xenemu's, or another implementation of PROTOCOL.md) over
the wire.  Over the wire a bed needs the control socket (the toolstack fixture) and the
hypercall socket; every domain speaks through its own connection, opened with its token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bed import Bed
from xenemu.abi.pv_iommu import Op, pack, unpack
from xenemu.client import SyncControlClient, SyncHypercallClient, XenError
from xenemu.core.errors import HypercallError


class CoreBed:
    """The interface over ``tests.bed.Bed`` (the pure core)."""

    name = "core"

    def __init__(self, **options: Any) -> None:
        self.bed = Bed(**options)
        self.host = self.bed.host

    @property
    def nr_frames(self) -> int:
        return self.host.frames.nr_frames

    def guest(
        self,
        kind: str = "hvm",
        memory: int = 64,
        device: str | None = "00:03.0",
        target: int | None = None,
        rmrr: list[tuple[int, int]] | None = None,
    ) -> int:
        return self.bed.guest(kind, memory, device, target, rmrr).domid

    def assign(self, domid: int, bdf: str, rmrr: list[tuple[int, int]] | None = None) -> int:
        try:
            self.host.assign_device(domid, bdf, rmrr)
        except HypercallError as exc:
            return exc.errno
        return 0

    def ioreq_server(self, caller: int, target: int) -> int:
        try:
            return self.host.emulators.create_server(caller, target).id
        except HypercallError as exc:
            return exc.errno

    def emulator(self, guest: int, device: str | None = "00:05.0", kind: str = "pv") -> tuple[int, int]:
        dm = self.guest(kind, 16, device, target=guest)
        return dm, self.ioreq_server(dm, guest)

    def call(self, domid: int, batch: Sequence[Op]) -> list[Op]:
        return self.bed.call(domid, batch)

    def raw(self, domid: int, buf: bytes, count: int) -> tuple[int, bytes]:
        data = bytearray(buf)
        ret = self.bed.raw(domid, data, count)
        return ret, bytes(data)

    def mfn(self, domid: int, gfn: int) -> int:
        return self.bed.mfn(self.host.domain(domid), gfn)

    def owned_frame(self, domid: int) -> int:
        frames = self.host.frames
        return next(m for m in range(frames.nr_frames) if frames.belongs_to(m, domid))

    def refs(self, mfn: int) -> tuple[int, int]:
        return self.bed.refs(mfn)

    def inject_fault(self, domid: int, bfn: int, clear: bool = False) -> None:
        if clear:
            self.host.iommu.clear_fault(domid, bfn)
        else:
            self.host.iommu.inject_fault(domid, bfn)

    def dma(self, domid: int, bdf: str, addr: int, data: bytes | None = None, length: int = 0) -> dict[str, Any]:
        result = self.host.device_dma(bdf, addr, data, length)
        return {"ok": result.ok, "data": result.data}

    def guest_write(self, domid: int, gfn: int, data: bytes, offset: int = 0) -> None:
        self.host.memory.access(domid, gfn, offset, data)

    def flushes(self, domid: int) -> dict[str, int]:
        ctx = self.host.iommu.contexts.get(domid)
        return dict(ctx.flushes) if ctx else {}

    def destroy(self, domid: int) -> int:
        try:
            self.host.destroy_domain(domid)
        except HypercallError as exc:
            return exc.errno
        return 0

    def audit(self) -> list[str]:
        from xenemu.core.audit import audit

        return audit(self.host)

    def close(self) -> None:
        pass


class WireBed:
    """The interface over a daemon's control and hypercall sockets."""

    name = "wire"

    def __init__(self, control_path: Path, hypercall_path: Path) -> None:
        self.control = SyncControlClient.connect(control_path)
        self.hypercall_path = hypercall_path
        self.clients: dict[int, SyncHypercallClient] = {}
        self.created: list[int] = []
        self.nr_frames = self.control.host_info()["options"]["nr_frames"]

    def client(self, domid: int) -> SyncHypercallClient:
        if domid not in self.clients:
            token = self.control.domain_token(domid)
            self.clients[domid] = SyncHypercallClient.connect(self.hypercall_path, token)
        return self.clients[domid]

    def guest(
        self,
        kind: str = "hvm",
        memory: int = 64,
        device: str | None = "00:03.0",
        target: int | None = None,
        rmrr: list[tuple[int, int]] | None = None,
    ) -> int:
        domid: int = self.control.create_domain(kind, memory, target)["domid"]
        self.created.append(domid)
        if device:
            self.control.assign_device(domid, device, rmrr or [])
        self.check()
        return domid

    def assign(self, domid: int, bdf: str, rmrr: list[tuple[int, int]] | None = None) -> int:
        try:
            self.control.assign_device(domid, bdf, rmrr or [])
        except XenError as exc:
            return exc.ret
        return 0

    def ioreq_server(self, caller: int, target: int) -> int:
        try:
            server: int = self.client(caller).create_ioreq_server(target)
        except XenError as exc:
            return exc.ret
        return server

    def emulator(self, guest: int, device: str | None = "00:05.0", kind: str = "pv") -> tuple[int, int]:
        dm = self.guest(kind, 16, device, target=guest)
        return dm, self.ioreq_server(dm, guest)

    def call(self, domid: int, batch: Sequence[Op]) -> list[Op]:
        ret, buf = self.client(domid).iommu_op_raw(bytes(pack(batch)), len(batch))
        assert ret == 0
        self.check()
        return unpack(buf)

    def raw(self, domid: int, buf: bytes, count: int) -> tuple[int, bytes]:
        ret, out = self.client(domid).iommu_op_raw(buf, count)
        self.check()
        return ret, out

    def mfn(self, domid: int, gfn: int) -> int:
        mfn: int = self.control.frame_info(domid=domid, gfn=gfn)["mfn"]
        return mfn

    def owned_frame(self, domid: int) -> int:
        for mfn in range(self.nr_frames):
            info = self.control.frame_info(mfn=mfn)
            if info["owner"] == domid and info["populated"]:
                return mfn
        raise AssertionError(f"d{domid} owns no frame")

    def refs(self, mfn: int) -> tuple[int, int]:
        info = self.control.frame_info(mfn=mfn)
        return info["count"], info["type_count"]

    def inject_fault(self, domid: int, bfn: int, clear: bool = False) -> None:
        self.control.inject_fault(domid, bfn, clear)

    def dma(self, domid: int, bdf: str, addr: int, data: bytes | None = None, length: int = 0) -> dict[str, Any]:
        reply: dict[str, Any] = self.client(domid).device_dma(bdf, addr, data, length)
        return reply

    def guest_write(self, domid: int, gfn: int, data: bytes, offset: int = 0) -> None:
        self.client(domid).guest_write(gfn, data, offset)

    def flushes(self, domid: int) -> dict[str, int]:
        dom = next(d for d in self.control.list_domains() if d["domid"] == domid)
        return dict(dom["flushes"])

    def destroy(self, domid: int) -> int:
        try:
            self.control.destroy_domain(domid)
        except XenError as exc:
            return exc.ret
        self.clients.pop(domid, None)
        return 0

    def audit(self) -> list[str]:
        violations: list[str] = self.control.audit()
        return violations

    def check(self) -> None:
        problems = self.audit()
        assert not problems, "\n".join(problems)

    def close(self) -> None:
        """Destroy what the case created, so one daemon serves many cases."""
        for domid in reversed(self.created):
            self.destroy(domid)
        for client in self.clients.values():
            client.close()
        self.control.close()


def check(bed: CoreBed | WireBed) -> None:
    problems = bed.audit()
    assert not problems, "\n".join(problems)


class DaemonProcess:
    """``xenemu serve`` as a subprocess on sockets in a temporary directory."""

    def __init__(self, directory: Path, *flags: str) -> None:
        self.directory = directory
        self.control_path = directory / "control.sock"
        self.hypercall_path = directory / "hypercall.sock"
        directory.mkdir(parents=True, exist_ok=True)
        self.log = open(directory / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xenemu", "--dir", str(directory), "serve", "--log-level", "warning", *flags],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 30
        while not (self.hypercall_path.exists() and self.control_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start: {(directory / 'daemon.log').read_text()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return (self.directory / "daemon.log").read_text()
