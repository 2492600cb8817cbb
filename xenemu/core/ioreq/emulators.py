"""An emulator's IOREQ servers as the rest of the host sees them: made for one guest, and
torn down with what they hold.

A server's M2B entries and the scratch entries its swapped mappings left behind live in the
IOMMU, so ending a server is an IOMMU operation; this module does it through the ``Iommu`` it
is handed, leaving ``servers`` a plain registry.
"""

from __future__ import annotations

from collections.abc import Generator

from xenemu.core.errors import EBUSY, ENOENT, ENOMEM, ENOSPC, EPERM, HypercallError
from xenemu.core.iommu import preempt, xen_changes
from xenemu.core.iommu.state import Iommu
from xenemu.core.ioreq.servers import IoreqRegistry, IoreqServer
from xenemu.core.memory.domain import DOMID_SELF
from xenemu.core.memory.guest import GuestMemory


class Emulators:
    """Creation, ownership checks and teardown of IOREQ servers."""

    def __init__(self, memory: GuestMemory, iommu: Iommu, registry: IoreqRegistry) -> None:
        self.memory = memory
        self.iommu = iommu
        self.registry = registry

    def create_server(self, caller: int, target: int) -> IoreqServer:
        dom = self.memory.domain(caller)
        if target == DOMID_SELF:
            target = caller
        guest = self.memory.domain(target)
        if not dom.privileged_over(guest):
            raise HypercallError(-EPERM, f"d{caller} is not privileged over d{target}")
        if self.registry.exhausted():
            raise HypercallError(-ENOSPC, "IOREQ server ids are exhausted")
        if not self.registry.quota_left(caller):
            raise HypercallError(-ENOSPC, f"d{caller} holds or has used up its IOREQ servers")
        scratch = self.iommu.frames.allocate_for_xen()
        if scratch is None:
            raise HypercallError(-ENOMEM, "no free frame for the IOREQ server's scratch frame")
        xen_changes.scratch_taken(self.iommu, scratch)
        self.iommu.flush_touched()
        return self.registry.create(caller, target, scratch)

    def own_server(self, caller: int, ioserver: int) -> IoreqServer:
        """The caller's own server, or -ENOENT / -EPERM."""
        server = self.registry.get(ioserver)
        if server is None:
            raise HypercallError(-ENOENT, f"no IOREQ server {ioserver}")
        if server.creator != caller:
            raise HypercallError(-EPERM, f"IOREQ server {ioserver} is not d{caller}'s")
        return server

    def destroy_server(self, caller: int, ioserver: int) -> None:
        """``destroying_server`` run to its end (tests and scripts)."""
        preempt.drain(self.destroying_server(caller, ioserver))

    def release_servers(self, creator: int) -> int:
        """``releasing_servers`` run to its end (tests and scripts)."""
        return preempt.drain(self.releasing_servers(creator))

    def destroying_server(self, caller: int, ioserver: int) -> Generator[str, None, None]:
        """``destroy_ioreq_server``: checked at once, then torn down in slices."""
        server = self.own_server(caller, ioserver)
        if self.memory.domain(caller).busy_ops:  # one of its foreign ops may be using it
            raise HypercallError(-EBUSY, f"d{caller} has an IOMMU op in flight")
        yield from self.end(server)
        self.iommu.flush_touched()

    def releasing_servers(self, creator: int) -> Generator[str, None, int]:
        """End every server ``creator`` made (its emulator went away); how many there were."""
        servers = [s for s in self.registry.servers.values() if s.creator == creator]
        for server in servers:
            yield from self.end(server)
        self.iommu.flush_touched()
        return len(servers)

    def forget_domain(self, domid: int) -> None:
        """The domain ``domid`` is gone: servers that served it serve nobody now, and the ids it
        consumed no longer count against a later domain given its number."""
        self.registry.created_by.pop(domid, None)
        self.forget_target(domid)

    def forget_target(self, domid: int) -> None:
        """The guest ``domid`` is gone: servers that served it serve nobody now."""
        for server in self.registry.servers.values():
            if server.target == domid:
                server.target = None

    def retire(self, server: IoreqServer) -> None:
        """The server is gone for every request from now on (``end`` gives back what it holds)."""
        if self.registry.servers.pop(server.id, None) is not None:
            self.registry.ending[server.id] = server
            self.registry.notify.discard(server.id)

    def end(self, server: IoreqServer) -> Generator[str, None, None]:
        """Remove a server with its M2B entries and scratch entries, then free its scratch
        frame (no flush at the end: the caller flushes once).  It is gone for every request at
        once; what it holds goes in slices, pausing between them (``preempt``)."""
        self.retire(server)
        yield from xen_changes.end_server(self.iommu, server.creator, server.id)
        del self.registry.ending[server.id]
        self.iommu.frames.put(server.scratch_mfn, writable=False)
        xen_changes.scratch_freed(self.iommu, server.scratch_mfn)
