"""IOREQ servers: an emulator's handle on one guest, its buffered ring and synchronous requests.

The ring is the real ``buffered_iopage_t`` from ``abi/ioreq.h`` (one page, 511 slots), so an
emulator reads exactly the bytes Xen would have put in its shared page. Nothing here blocks: a
synchronous request is a record the emulator completes later, and whoever waits on it asks
``is_pending``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from xenemu.abi import const, ffi

MAX_IOSERVID = 65535
#: Live servers one emulator's domain may hold at once (Xen's MAX_NR_IOREQ_SERVERS), and ids it
#: may consume over its life: ids are never reused, so without the second bound one emulator
#: creating and destroying servers would use up the host's 65,535.
MAX_SERVERS_PER_DOMAIN = 8
MAX_SERVER_IDS_PER_DOMAIN = 256
SLOTS = const("IOREQ_BUFFER_SLOT_NUM")
PAGE_BYTES = ffi.sizeof("buffered_iopage_t")
IOREQ_BYTES = ffi.sizeof("ioreq_t")
IOREQ_TYPE_INVALIDATE = const("IOREQ_TYPE_INVALIDATE")
IOREQ_WRITE = const("IOREQ_WRITE")
STATE_IOREQ_READY = const("STATE_IOREQ_READY")
STATE_IORESP_READY = const("STATE_IORESP_READY")
SIZE_4 = const("BUF_IOREQ_SIZE_4")
SIZE_8 = const("BUF_IOREQ_SIZE_8")
U32 = 1 << 32


@dataclass(eq=False)
class IoreqServer:
    id: int
    #: The emulator's domain.
    creator: int
    #: The guest it serves; None once that guest is destroyed.
    target: int | None
    #: Its own scratch frame (Xen's), where its swapped mappings point: no two servers share
    #: one, so no data passes between emulators through scratch entries.
    scratch_mfn: int
    page: bytearray = field(default_factory=lambda: bytearray(PAGE_BYTES))
    #: Synchronous requests the emulator has not completed yet, by request id.
    #: Synchronous requests by id, oldest first (so the oldest are found at once however many
    #: were completed before them).
    pending: OrderedDict[int, bytearray] = field(default_factory=OrderedDict)
    next_sync_id: int = 1
    buffered_sent: int = 0
    sync_sent: int = 0

    @property
    def ring(self) -> Any:
        return ffi.from_buffer("buffered_iopage_t *", self.page)

    def free_slots(self) -> int:
        ring = self.ring
        used: int = (ring.write_pointer - ring.read_pointer) % U32
        return SLOTS - used

    def send_invalidate(self, bfn: int) -> int | None:
        """Announce ``bfn``: on the buffered ring if it has room (None), else as a new
        synchronous request, whose id is returned."""
        wide = bfn >= U32
        if self.free_slots() >= (2 if wide else 1):
            ring = self.ring
            halves = (bfn & (U32 - 1), bfn >> 32) if wide else (bfn,)
            for half in halves:
                slot = ring.buf_ioreq[ring.write_pointer % SLOTS]
                slot.type = IOREQ_TYPE_INVALIDATE
                slot.dir = IOREQ_WRITE
                slot.size = SIZE_8 if wide else SIZE_4
                slot.addr = 0
                slot.data = half
                ring.write_pointer = (ring.write_pointer + 1) % U32
            self.buffered_sent += 1
            return None
        req = bytearray(IOREQ_BYTES)
        view = ffi.from_buffer("ioreq_t *", req)
        view.addr = 0
        view.data = bfn
        view.count = 1
        view.size = 8
        view.dir = IOREQ_WRITE
        view.type = IOREQ_TYPE_INVALIDATE
        view.state = STATE_IOREQ_READY
        req_id = self.next_sync_id
        self.next_sync_id += 1
        self.pending[req_id] = req
        self.sync_sent += 1
        return req_id

    def acknowledge(self, read_pointer: int) -> bool:
        """The emulator consumed the ring up to ``read_pointer``; False if that is impossible."""
        ring = self.ring
        unread = (ring.write_pointer - ring.read_pointer) % U32
        advance = (read_pointer - ring.read_pointer) % U32
        if not 0 <= read_pointer < U32 or advance > unread:
            return False
        ring.read_pointer = read_pointer
        return True

    def complete(self, req_id: int) -> bool:
        req = self.pending.pop(req_id, None)
        if req is None:
            return False
        ffi.from_buffer("ioreq_t *", req).state = STATE_IORESP_READY
        return True


class IoreqRegistry:
    """Server ids rise from 1 and are never reused on the host."""

    def __init__(self) -> None:
        self.servers: dict[int, IoreqServer] = {}
        #: Servers being torn down in slices: gone for every request (``get`` does not find
        #: them), but their M2B and scratch entries and scratch frame are not all given back yet.
        self.ending: dict[int, IoreqServer] = {}
        self.next_id = 1
        #: Servers with new requests their emulator has not been told of yet.
        self.notify: set[int] = set()
        #: Ids each live domain has consumed (forgotten when the domain is destroyed).
        self.created_by: dict[int, int] = {}

    def quota_left(self, creator: int) -> bool:
        """Whether ``creator`` may make one more server (live and lifetime bounds)."""
        live = sum(1 for s in self.servers.values() if s.creator == creator)
        return live < MAX_SERVERS_PER_DOMAIN and self.created_by.get(creator, 0) < MAX_SERVER_IDS_PER_DOMAIN

    def exhausted(self) -> bool:
        return self.next_id > MAX_IOSERVID

    def create(self, creator: int, target: int, scratch_mfn: int) -> IoreqServer:
        assert not self.exhausted()
        server = IoreqServer(self.next_id, creator, target, scratch_mfn)
        self.created_by[creator] = self.created_by.get(creator, 0) + 1
        self.servers[server.id] = server
        self.next_id += 1
        return server

    def get(self, ioserver: int) -> IoreqServer | None:
        return self.servers.get(ioserver)

    def known(self, ioserver: int) -> IoreqServer | None:
        """A live server or one being torn down (whose entries still exist)."""
        return self.servers.get(ioserver) or self.ending.get(ioserver)

    def serves(self, ioserver: int, creator: int, target: int) -> bool:
        server = self.servers.get(ioserver)
        return server is not None and server.creator == creator and server.target == target

    def is_pending(self, ioserver: int, req_id: int) -> bool:
        """Whether a synchronous request still waits for its emulator (False once the server is gone)."""
        server = self.servers.get(ioserver)
        return server is not None and req_id in server.pending
