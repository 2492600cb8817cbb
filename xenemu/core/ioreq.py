"""IOREQ servers: an emulator's handle on one guest, and the tag on its foreign mappings."""

from __future__ import annotations

from dataclasses import dataclass

MAX_IOSERVID = 65535


@dataclass
class IoreqServer:
    id: int
    #: The emulator's domain.
    creator: int
    #: The guest it serves; None once that guest is destroyed.
    target: int | None


class IoreqRegistry:
    """Server ids rise from 1 and are never reused on the host."""

    def __init__(self) -> None:
        self.servers: dict[int, IoreqServer] = {}
        self.next_id = 1

    def exhausted(self) -> bool:
        return self.next_id > MAX_IOSERVID

    def create(self, creator: int, target: int) -> IoreqServer:
        assert not self.exhausted()
        server = IoreqServer(self.next_id, creator, target)
        self.servers[server.id] = server
        self.next_id += 1
        return server

    def get(self, ioserver: int) -> IoreqServer | None:
        return self.servers.get(ioserver)

    def serves(self, ioserver: int, creator: int, target: int) -> bool:
        server = self.servers.get(ioserver)
        return server is not None and server.creator == creator and server.target == target
