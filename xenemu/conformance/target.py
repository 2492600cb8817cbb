"""What a case sees of the implementation under test: its two sockets, spoken to as a
toolstack (control.sock) and as guests (hypercall.sock), and nothing else.

``Bed`` is the part of that interface that needs no raw sockets; the test suite also runs
the cases written against it on xenemu's core in-process. ``Target`` is it over the wire:
every domain a case creates speaks through its own connection, opened with its token, the
audit runs after every call, and ``close`` destroys what the case created, so one daemon
serves every case in turn.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from xenemu.abi.pv_iommu import Op, pack, unpack
from xenemu.client import SyncControlClient, SyncHypercallClient, XenError
from xenemu.wire import FrameDecoder, encode

#: How long any reply may take before a case fails (a daemon that stalls is a failure).
REPLY_TIMEOUT = 20.0


class NotChecked(Exception):
    """The case cannot check its rule on this target (the reason is the message)."""


class Bed(Protocol):
    """The requests the cases written for both the core and a daemon use."""

    nr_frames: int

    def guest(
        self,
        kind: str = "hvm",
        memory: int = 64,
        device: str | None = "00:03.0",
        target: int | None = None,
        rmrr: list[tuple[int, int]] | None = None,
    ) -> int: ...
    def assign(self, domid: int, bdf: str, rmrr: list[tuple[int, int]] | None = None) -> int: ...
    def ioreq_server(self, caller: int, target: int) -> int: ...
    def emulator(self, guest: int, device: str | None = "00:05.0", kind: str = "pv") -> tuple[int, int]: ...
    def call(self, domid: int, batch: Sequence[Op]) -> list[Op]: ...
    def raw(self, domid: int, buf: bytes, count: int) -> tuple[int, bytes]: ...
    def mfn(self, domid: int, gfn: int) -> int: ...
    def owned_frame(self, domid: int) -> int: ...
    def refs(self, mfn: int) -> tuple[int, int]: ...
    def inject_fault(self, domid: int, bfn: int, clear: bool = False) -> None: ...
    def dma(self, domid: int, bdf: str, addr: int, data: bytes | None = None, length: int = 0) -> dict[str, Any]: ...
    def guest_write(self, domid: int, gfn: int, data: bytes, offset: int = 0) -> None: ...
    def flushes(self, domid: int) -> dict[str, int]: ...
    def destroy(self, domid: int) -> int: ...
    def audit(self) -> list[str]: ...


class Raw:
    """A bare socket speaking frames, so a case can send what no client library would."""

    def __init__(self, path: Path, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the daemon has closed the connection."""
        while True:
            message = self.decoder.next()
            if message is not None:
                assert isinstance(message, dict), f"a reply that is not a map: {message!r:.80}"
                return message
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            except TimeoutError:
                raise AssertionError("no reply and no close in time") from None
            if not data:
                return None
            self.decoder.feed(data)

    def pending(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def hello(self, token: str | None, version: int = 1) -> dict[str, Any] | None:
        args: dict[str, Any] = {"version": version}
        if token is not None:
            args["token"] = token
        self.send({"id": 1, "op": "hello", "args": args})
        return self.recv()

    def close(self) -> None:
        self.sock.close()


class Target:
    """The bed interface over a daemon's control and hypercall sockets."""

    name = "wire"

    def __init__(self, control_path: Path, hypercall_path: Path) -> None:
        self.control_path = Path(control_path)
        self.hypercall_path = Path(hypercall_path)
        self.control = SyncControlClient.connect(control_path)
        self.control.set_timeout(REPLY_TIMEOUT)
        self.clients: dict[int, SyncHypercallClient] = {}
        self.created: list[int] = []
        self.raws: list[Raw] = []
        self.info: dict[str, Any] = self.control.host_info()
        self.options: dict[str, Any] = dict(self.info.get("options", {}))
        self.nr_frames = int(self.options.get("nr_frames", 0))

    # -- what only a daemon has --------------------------------------------------------------
    def client(self, domid: int) -> SyncHypercallClient:
        if domid not in self.clients:
            token = self.control.domain_token(domid)
            self.clients[domid] = self.connect(token)
        return self.clients[domid]

    def connect(self, token: str) -> SyncHypercallClient:
        client = SyncHypercallClient.connect(self.hypercall_path, token)
        client.set_timeout(REPLY_TIMEOUT)
        return client

    def raw(self, domid: int, buf: bytes, count: int) -> tuple[int, bytes]:
        ret, out = self.client(domid).iommu_op_raw(buf, count)
        self.check()
        return ret, out or b""

    def socket(self, channel: str = "hypercall", timeout: float = 5.0) -> Raw:
        """A raw connection, closed with the target."""
        raw = Raw(self.hypercall_path if channel == "hypercall" else self.control_path, timeout)
        self.raws.append(raw)
        return raw

    def domain(self, kind: str = "hvm", memory: int = 64, **kw: Any) -> dict[str, Any]:
        """``create_domain`` itself: the reply (``domid``, ``token``); destroyed at the end."""
        reply: dict[str, Any] = self.control.create_domain(kind, memory, **kw)
        self.created.append(reply["domid"])
        return reply

    def forget(self, domid: int) -> None:
        """The case destroyed ``domid`` itself."""
        self.clients.pop(domid, None)
        if domid in self.created:
            self.created.remove(domid)

    # -- the bed interface --------------------------------------------------------------------
    def guest(
        self,
        kind: str = "hvm",
        memory: int = 64,
        device: str | None = "00:03.0",
        target: int | None = None,
        rmrr: list[tuple[int, int]] | None = None,
    ) -> int:
        domid: int = self.domain(kind, memory, target=target)["domid"]
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
        assert ret == 0 and buf is not None, f"iommu_op returned {ret}"
        self.check()
        return unpack(buf)

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
        if not self.options.get("fault_injection"):
            raise NotChecked("the target has no fault injection (host_info options.fault_injection)")
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
        self.forget(domid)
        return 0

    def audit(self) -> list[str]:
        violations: list[str] = self.control.audit()
        return violations

    def check(self) -> None:
        problems = self.audit()
        assert not problems, "audit: " + "; ".join(problems)[:400]

    def close(self) -> None:
        """Destroy what the case created, so one daemon serves many cases."""
        for raw in self.raws:
            raw.close()
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        try:
            for domid in reversed(self.created):
                self.destroy(domid)
        finally:
            self.control.close()
