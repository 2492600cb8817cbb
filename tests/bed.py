"""A test bed over the pure core: build hosts, run batches, audit after every call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xenemu.abi.pv_iommu import Op, pack, unpack
from xenemu.core.actions.dispatch import Action, run
from xenemu.core.audit import audit
from xenemu.core.host import Host
from xenemu.core.iommu.context import IommuContext
from xenemu.core.iommu.subops import run_iommu_op
from xenemu.core.memory.domain import Domain
from xenemu.core.options import HostOptions

#: Whether beds use the compiled fast path; the core and conformance suites run both ways.
FAST_PATH = {"on": True}


class Bed:
    def __init__(self, **options: Any) -> None:
        options.setdefault("fast_path", FAST_PATH["on"])
        options.setdefault("nr_frames", 1 << 13)
        options.setdefault("dom0_memory", 512)
        options.setdefault("fault_injection", True)
        self.host = Host(HostOptions(**options))

    @property
    def dom0(self) -> Domain:
        return self.host.hwdom

    def guest(
        self,
        kind: str = "hvm",
        memory: int = 64,
        device: str | None = "00:03.0",
        target: int | None = None,
        rmrr: list[tuple[int, int]] | None = None,
    ) -> Domain:
        dom = self.host.create_domain(kind, memory, target)  # type: ignore[arg-type]
        if device:
            self.host.assign_device(dom.domid, device, rmrr)
        self.check()
        return dom

    def call(self, domid: int, ops: Sequence[Op]) -> list[Op]:
        buf = pack(ops)
        ret = run_iommu_op(self.host.iommu, domid, buf, len(ops))
        assert ret == 0
        self.check()
        return unpack(buf)

    def one(self, domid: int, op: Op) -> Op:
        return self.call(domid, [op])[0]

    def status(self, domid: int, op: Op) -> str:
        return self.one(domid, op).status_name

    def raw(self, domid: int, buf: bytearray, count: int) -> int:
        ret = run_iommu_op(self.host.iommu, domid, buf, count)
        self.check()
        return ret

    def act(self, domid: int, action: Action) -> Any:
        result = run(self.host, domid, action)
        self.check()
        return result

    def check(self) -> None:
        problems = audit(self.host)
        assert not problems, "\n".join(problems)

    def refs(self, mfn: int) -> tuple[int, int]:
        frames = self.host.frames
        return frames.count[mfn], frames.type_count[mfn]

    def mfn(self, dom: Domain, gfn: int) -> int:
        mfn = self.host.memory.gfn_to_mfn(dom, gfn)
        assert mfn is not None
        return mfn

    def flushes(self, dom: Domain) -> dict[str, int]:
        return dict(self.ctx(dom).flushes)

    def ctx(self, dom: Domain) -> IommuContext:
        """The domain's IOMMU context (it must have one)."""
        ctx = self.host.iommu.contexts.get(dom.domid)
        assert ctx is not None, f"d{dom.domid} has no IOMMU context"
        return ctx

    def emulator(self, guest: Domain, device: str | None = "00:05.0", kind: str = "pv") -> tuple[Domain, int]:
        """A device-model domain privileged over ``guest``, with an IOREQ server for it."""
        dm = self.guest(kind, 16, device, target=guest.domid)
        server = self.host.emulators.create_server(dm.domid, guest.domid)
        return dm, server.id
