"""A vITS's device, collection and ITT tables in guest RAM, laid out as KVM lays out an ITS's
tables when it saves them (its table ABI, revision 0), and read back from there on a restore.

The guest gave the ITS this memory (``GITS_BASER0`` the device table, ``GITS_BASER1`` the
collection table, each ``MAPD`` an ITT), so a save writes the vITS's mappings there and the
domain's pages carry them; nothing of them is in META. Every entry is 8 bytes, little-endian:

- DTE, at ``BASER0`` + 8 x DeviceID: bit 63 Valid, bits 62:49 the distance in DeviceIDs to the
  next valid DTE (0: the last; at most 2^14 - 1), bits 48:5 the ITT's address bits 51:8,
  bits 4:0 the ``MAPD`` Size (EventID bits - 1).
- ITE, at the ITT + 8 x EventID: bits 63:48 the distance in EventIDs to the next ITE (0: the
  last), bits 47:16 the pINTID (the guest's vLPI), bits 15:0 the ICID. Zero: no mapping.
- CTE, one after another from ``BASER1`` (not indexed by ICID), ended by a zero entry when the
  table has room for one: bit 63 Valid, bits 51:16 RDBase (a vCPU number, ``GITS_TYPER.PTA`` is
  0; ``0xFFFFFFFF`` for a collection that ITEs name but no ``MAPC`` maps), bits 15:0 the ICID.

Tables are flat (Indirect is RAZ/WI) with 64 KiB pages. A save writes, per vITS, the DTEs of
every virtual DeviceID up to its highest (zero where unmapped), each mapped device's ITEs for
every event its ITT and the device both have (zero where unmapped), and its CTEs; so a restore
reads exactly those entries and nothing the guest left elsewhere in its memory.

This room knows the layout and nothing of how the vITS runs: ``plan`` says what to write (or why
it cannot be written), ``read`` decodes what a ``Reader`` finds, with every check a lying image
could fail.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from xenemu.core.errors import EINVAL, HypercallError
from xenemu.core.migration.image import HELD, Image, refuse

ENTRY = 8
#: The tables' page size (GITS_BASER.Page_Size is fixed at 64 KiB).
TABLE_PAGE = 64 * 1024
BASER_VALID = 1 << 63
BASER_ADDR = ((1 << 48) - 1) & ~(TABLE_PAGE - 1)  # bits 47:16
BASER_SIZE = 0xFF  # pages - 1
DTE_VALID = 1 << 63
DTE_NEXT_SHIFT, DTE_NEXT_MAX = 49, (1 << 14) - 1
DTE_ITT_SHIFT, DTE_ITT_MASK = 5, ((1 << 44) - 1) << 5  # the ITT's address >> 8
DTE_SIZE = 0x1F
CTE_VALID = 1 << 63
CTE_RDBASE_SHIFT, CTE_RDBASE_MASK = 16, ((1 << 36) - 1) << 16
CTE_ICID = 0xFFFF
#: KVM's RDBase for a collection that exists (an ITE names it) but that no MAPC maps.
UNMAPPED = 0xFFFF_FFFF
ITE_NEXT_SHIFT, ITE_NEXT_MAX = 48, 0xFFFF
ITE_PINTID_SHIFT, ITE_PINTID = 16, 0xFFFF_FFFF
ITE_ICID = 0xFFFF
#: The EventID bits a MAPD's Size may give (GITS_TYPER: 16).
EVENTID_BITS = 16
PAGE = 4096

#: ``(gpa, length)`` -> the bytes there, or None if a page of it is not the domain's RAM.
Reader = Callable[[int, int], bytes | None]


@dataclass
class Tables:
    """What one vITS's tables hold."""

    #: vDeviceID -> (MAPD Size, ITT address), the mapped devices.
    devices: dict[int, tuple[int, int]]
    #: (vDeviceID, EventID) -> (vLPI, ICID).
    ites: dict[tuple[int, int], tuple[int, int]]
    #: ICID -> vCPU, or None for a collection that ITEs name and no MAPC maps.
    collections: dict[int, int | None]


@dataclass
class Region:
    """Bytes to write at a guest-physical address, and what they are (for a refusal's message)."""

    gpa: int
    data: bytes
    what: str


def table(baser: int) -> tuple[int, int]:
    """A flat table's address and how many 8-byte entries it holds."""
    return baser & BASER_ADDR, ((baser & BASER_SIZE) + 1) * TABLE_PAGE // ENTRY


def itt_events(size: int, events: int) -> int:
    """The ITT entries a save writes and a restore reads: EventIDs both its Size and the
    device's events allow."""
    return min(1 << (size + 1), events)


def _nexts(ids: list[int], cap: int) -> dict[int, int]:
    """Each ID's distance to the next in ``ids`` (ascending), capped; 0 for the last."""
    return {a: min(b - a, cap) for a, b in pairwise(ids)} | ({ids[-1]: 0} if ids else {})


def _pack(entries: list[int]) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)


def plan(pits: int, baser: list[int], vdevids: dict[int, int], tables: Tables) -> list[Region]:
    """What a save writes for one vITS: its device table, ITTs and collection table.

    ``vdevids``: each of its devices' events, by vDeviceID. Refused with ``-EINVAL`` when a table
    that has entries to hold is not Valid, or an ID lies beyond its table (the vITS's tables do
    not limit IDs while it runs; the layout does)."""
    out: list[Region] = []
    base, entries = table(baser[0])
    if tables.devices and not baser[0] & BASER_VALID:
        raise HypercallError(-EINVAL, f"vITS {pits} has mapped devices and GITS_BASER0 is not Valid")
    if baser[0] & BASER_VALID:
        beyond = [v for v in tables.devices if v >= entries]
        if beyond:
            raise HypercallError(
                -EINVAL, f"vITS {pits}: DeviceID {min(beyond)} is beyond its device table ({entries} entries)"
            )
        mapped = sorted(tables.devices)
        nexts = _nexts(mapped, DTE_NEXT_MAX)
        dtes = [0] * min(max(vdevids) + 1, entries)
        for v in mapped:
            size, itt = tables.devices[v]
            dtes[v] = DTE_VALID | nexts[v] << DTE_NEXT_SHIFT | (itt >> 8) << DTE_ITT_SHIFT | size
        out.append(Region(base, _pack(dtes), f"vITS {pits}'s device table"))
    for v in sorted(tables.devices):
        size, itt = tables.devices[v]
        events = sorted(e for d, e in tables.ites if d == v)
        nexts = _nexts(events, ITE_NEXT_MAX)
        ites = [0] * itt_events(size, vdevids[v])
        for e in events:
            vlpi, icid = tables.ites[(v, e)]
            ites[e] = nexts[e] << ITE_NEXT_SHIFT | vlpi << ITE_PINTID_SHIFT | icid
        out.append(Region(itt, _pack(ites), f"the ITT of vITS {pits}'s device {v}"))
    base, entries = table(baser[1])
    if tables.collections and not baser[1] & BASER_VALID:
        raise HypercallError(-EINVAL, f"vITS {pits} has collections and GITS_BASER1 is not Valid")
    if baser[1] & BASER_VALID:
        if len(tables.collections) > entries:
            raise HypercallError(-EINVAL, f"vITS {pits}: its collections overrun its collection table")
        ctes = [
            CTE_VALID | (UNMAPPED if vcpu is None else vcpu) << CTE_RDBASE_SHIFT | icid
            for icid, vcpu in sorted(tables.collections.items())
        ]
        terminator = [0] if len(ctes) < entries else []
        out.append(Region(base, _pack(ctes + terminator), f"vITS {pits}'s collection table"))
    return out


def check_regions(regions: list[Region], keep_out: list[Region], in_ram: Callable[[int, int], bool]) -> None:
    """Every region in the domain's RAM (KVM's write into guest memory fails with ``-EFAULT``;
    the ABI here has no such errno, so ``-EINVAL``), and none overlapping another or a range the
    save must not overwrite, such as the command queue or the LPI configuration table
    (``-EINVAL``: one would overwrite the other)."""
    for r in regions:
        if r.data and not in_ram(r.gpa, len(r.data)):
            raise HypercallError(-EINVAL, f"{r.what} at {r.gpa:#x} is not in the domain's RAM")
    spans = sorted((r.gpa, r.gpa + len(r.data), r.what) for r in [*regions, *keep_out] if r.data)
    reach, widest = -1, ""
    for start, end, what in spans:
        if start < reach:
            raise HypercallError(-EINVAL, f"{widest} and {what} overlap: one would overwrite the other")
        if end > reach:
            reach, widest = end, what


def read(pits: int, baser: list[int], vdevids: dict[int, int], vcpus: int, limit: int, reader: Reader) -> Tables:
    """One vITS's tables as a save wrote them; ``-EBADMSG`` for anything a save would not write.

    ``limit``: one past the largest vLPI ``GICR_PROPBASER`` allows."""
    where = f"vITS {pits}'s"
    collections: dict[int, int | None] = {}
    if baser[1] & BASER_VALID:
        base, entries = table(baser[1])
        for i in range(min(entries, vcpus + 2)):
            cte = _entries(reader, base + i * ENTRY, 1, f"{where} collection table")[0]
            if not cte:
                break
            icid, target = cte & CTE_ICID, (cte & CTE_RDBASE_MASK) >> CTE_RDBASE_SHIFT
            if not cte & CTE_VALID or cte & ~(CTE_VALID | CTE_RDBASE_MASK | CTE_ICID):
                raise refuse(f"{where} collection table has an entry that is not a CTE")
            if icid >= vcpus + 1 or icid in collections or not (target < vcpus or target == UNMAPPED):
                raise refuse(f"{where} collection table has an ICID or vCPU out of range, or an ICID twice")
            collections[icid] = None if target == UNMAPPED else target
    devices: dict[int, tuple[int, int]] = {}
    if baser[0] & BASER_VALID:
        base, entries = table(baser[0])
        dtes = _entries(reader, base, min(max(vdevids) + 1, entries), f"{where} device table")
        valid = [v for v, dte in enumerate(dtes) if dte]
        nexts = _nexts(valid, DTE_NEXT_MAX)
        for v in valid:
            dte = dtes[v]
            size = dte & DTE_SIZE
            if not dte & DTE_VALID or v not in vdevids or size + 1 > EVENTID_BITS:
                raise refuse(f"{where} device table has an entry that is not a DTE of one of its devices")
            if (dte >> DTE_NEXT_SHIFT) & DTE_NEXT_MAX != nexts[v]:
                raise refuse(f"{where} device table's next offset of DeviceID {v} is not the next DTE's")
            devices[v] = (size, ((dte & DTE_ITT_MASK) >> DTE_ITT_SHIFT) << 8)
    ites: dict[tuple[int, int], tuple[int, int]] = {}
    for v, (size, itt) in sorted(devices.items()):
        entries_ = _entries(reader, itt, itt_events(size, vdevids[v]), f"the ITT of {where} device {v}")
        events = [e for e, ite in enumerate(entries_) if ite]
        nexts = _nexts(events, ITE_NEXT_MAX)
        for e in events:
            ite = entries_[e]
            vlpi, icid = (ite >> ITE_PINTID_SHIFT) & ITE_PINTID, ite & ITE_ICID
            if not 8192 <= vlpi < limit:
                raise refuse(f"the ITT of {where} device {v} maps event {e} to an INTID out of range")
            if icid not in collections:
                raise refuse(f"the ITT of {where} device {v} names a collection its collection table has not")
            if ite >> ITE_NEXT_SHIFT != nexts[e]:
                raise refuse(f"the ITT of {where} device {v}: the next offset of event {e} is not the next ITE's")
            ites[(v, e)] = (vlpi, icid)
    return Tables(devices, ites, collections)


def _entries(reader: Reader, gpa: int, count: int, what: str) -> list[int]:
    data = reader(gpa, count * ENTRY) if count else b""
    if data is None:
        raise refuse(f"{what} at {gpa:#x} is not in the domain's RAM")
    return list(struct.unpack(f"<{count}Q", data))


def image_reader(image: Image, below: Callable[[int], bytes | None] | None = None) -> Reader:
    """Reads the image's RAM as the restored domain will have it (before anything is built);
    its index of the pages is made at the first read (a domain without a vITS reads nothing).
    ``below``: a GFN's page where the image has none (a live migration's receiver, whose earlier
    sections are in its domain already; None there, as here, is a zero page)."""
    pages: dict[int, bytes | memoryview] = {}
    populated: set[int] = set()

    def read_image(gpa: int, length: int) -> bytes | None:
        if not populated and image.gfns:
            pages.update((ref, page) for ref, page in image.pages if not ref & HELD)
            populated.update(image.gfns)
        out = bytearray()
        while length > 0:
            gfn, offset = divmod(gpa, PAGE)
            if gfn not in populated:
                return None
            n = min(length, PAGE - offset)
            page = pages.get(gfn)
            if page is None and below is not None:
                page = below(gfn)
            out += bytes(page[offset : offset + n]) if page is not None else bytes(n)
            gpa, length = gpa + n, length - n
        return bytes(out)

    return read_image
