"""The conformance suite's ``Bed`` interface on the pure core, in-process.

The suite (``xenemu.conformance``) checks daemons over the wire through ``Target``; the cases
written against ``Bed`` alone (``Rule.core``) also run here, on xenemu's core directly, so the
same rule checks both. ``DaemonProcess`` (the suite's launcher) is re-exported for the tests
that start daemons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tests.bed import Bed
from xenemu.abi.pv_iommu import Op
from xenemu.conformance.launch import DaemonProcess
from xenemu.core.errors import HypercallError

__all__ = ["CoreBed", "DaemonProcess"]


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
