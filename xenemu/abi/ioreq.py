"""Reading an IOREQ server's shared pages as an emulator does (client side, via cffi)."""

from __future__ import annotations

from dataclasses import dataclass

from xenemu.abi import const, ffi

SLOTS = const("IOREQ_BUFFER_SLOT_NUM")
SIZE_8 = const("BUF_IOREQ_SIZE_8")
U32 = 1 << 32


@dataclass(frozen=True)
class BufferedRequest:
    type: int
    dir: int
    addr: int
    #: The whole value: a 64-bit one is reassembled from its two slots.
    data: int


@dataclass(frozen=True)
class SyncRequest:
    id: int
    type: int
    dir: int
    addr: int
    data: int
    size: int
    state: int


def read_ring(page: bytes) -> tuple[list[BufferedRequest], int]:
    """Every unread request on a ``buffered_iopage_t``, and the read pointer that acknowledges them."""
    view = ffi.from_buffer("buffered_iopage_t *", bytearray(page))
    rp, wp = view.read_pointer, view.write_pointer
    out = []
    while (wp - rp) % U32:
        slot = view.buf_ioreq[rp % SLOTS]
        data = slot.data
        rp = (rp + 1) % U32
        if slot.size == SIZE_8:
            if not (wp - rp) % U32:
                break  # the high half is not written yet: leave both slots for later
            data |= view.buf_ioreq[rp % SLOTS].data << 32
            rp = (rp + 1) % U32
        out.append(BufferedRequest(slot.type, slot.dir, slot.addr, data))
    return out, rp


def read_sync(req_id: int, raw: bytes) -> SyncRequest:
    view = ffi.from_buffer("ioreq_t *", bytearray(raw))
    return SyncRequest(req_id, view.type, view.dir, view.addr, view.data, view.size, view.state)
