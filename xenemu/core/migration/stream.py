"""A live migration between two of the toolstack's requests, and the stream it sends.

``Migrations`` holds a host's migrations out (``Outgoing``: the domain, the round and what is
left of it) and in (``Incoming``: the domain being built). A pre-copy section is the save
format's framing (``image.py``) with header flags ``PRECOPY`` and records META, SENT, GONE and
DATA (PROTOCOL.md 14.1); the last section is a save image with flags ``FINAL``.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

from xenemu.core.host import Host
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.frames import PAGE_SIZE
from xenemu.core.migration.image import REF, frame_steps, records, refuse

#: Header flags of a pre-copy section.
PRECOPY = 1
#: The most pages one section carries (32 MiB: a receiver holds one section at a time).
SECTION_PAGES = 8192
#: Pages copied (source) or written (receiver) between two pauses: about a millisecond.
COPY_SLICE = 1024
#: Migrations a host runs out, and receives, at once; one more abandons the oldest.
MAX_MIGRATIONS = 4
#: Distinct GFNs a p2m log holds beyond the domain's pages before it overflows (and the next
#: round sends every page: a guest churning GFNs cannot grow the log without bound).
LOG_SLACK = 4096
PRECOPY_TAGS = (b"META", b"SENT", b"GONE", b"DATA")


@dataclass
class Outgoing:
    """A domain being migrated out, between two of the toolstack's requests."""

    dom: Domain
    #: GFNs of the current round still to send, ascending, from ``at`` on.
    todo: array[int]
    at: int = 0
    #: Rounds begun (the first sends every populated page).
    round: int = 1
    #: Pages the current round found dirty when it began (the first: every page).
    dirtied: int = 0
    #: Pages sent so far (zero pages included, as SENT without DATA).
    sent: int = 0
    suspended: bool = False
    #: The receiver has the domain and the toolstack said so (``commit``): the source's copy
    #: never runs again here, whatever happens to the toolstack (it can only be destroyed).
    committed: bool = False
    #: Its device-model domains move with it (``--with-dm``), stopped and copied at the stop.
    with_dm: bool = False
    #: The device models stopped with it (their images went in the last section's company).
    dms: list[int] = field(default_factory=list)


@dataclass
class Incoming:
    """A domain being received: created at the first section, completed by the last."""

    dom: Domain
    sections: int = 0
    pages: int = 0
    #: The last section is applied: the domain (and its device models) wait, paused, for
    #: ``resume``, which gives them their tokens (the source must have let go first).
    ready: bool = False
    token: str = ""
    #: Its device models restored with it: (domid, token), paused with it.
    models: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Migrations:
    """A host's migrations, out and in, by id (ids rise and are never reused)."""

    outgoing: dict[int, Outgoing] = field(default_factory=dict)
    incoming: dict[int, Incoming] = field(default_factory=dict)
    next_id: int = 1

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def log_on(host: Host, dom: Domain) -> None:
    """Log-dirty mode for ``dom``: its p2m's log, and DMA dirty bits host-wide."""
    dom.p2m.log = set()
    dom.p2m.log_limit = max(dom.pages, dom.max_pages) + LOG_SLACK
    dom.p2m.log_overflowed = False
    host.iommu.dirty_tracking_on(dom.domid)


def log_off(host: Host, out: Outgoing) -> None:
    out.dom.p2m.log = None
    host.iommu.dirty_tracking_off(out.dom.domid)


def prune(host: Host, migrations: Migrations) -> None:
    """Migrations whose domain was destroyed meanwhile end (the toolstack may have died)."""
    for ident, out in list(migrations.outgoing.items()):
        if host.domains.get(out.dom.domid) is not out.dom:
            del migrations.outgoing[ident]
            log_off(host, out)
    for ident, inc in list(migrations.incoming.items()):
        if host.domains.get(inc.dom.domid) is not inc.dom:
            del migrations.incoming[ident]


def encode_precopy(
    meta: dict[str, Any], sent: array[int], gone: array[int], data: list[bytes]
) -> Generator[str, None, bytes]:
    """A pre-copy section's bytes (``PRECOPY`` flags, META/SENT/GONE/DATA), framed and summed as
    every image is."""
    payloads: list[list[bytes | memoryview]] = [
        [json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()],
        [sent.tobytes()],
        [gone.tobytes()],
        list(data),
    ]
    lengths = [sum(len(p) for p in payload) for payload in payloads]
    return (yield from frame_steps(PRECOPY, PRECOPY_TAGS, payloads, lengths))


@dataclass
class Precopy:
    meta: dict[str, Any]
    sent: list[int]
    gone: list[int]
    pages: dict[int, memoryview]


def decode_precopy(raw: bytes | bytearray) -> Precopy:
    """Check and parse a pre-copy section (its checksum already summed)."""
    meta_raw, sent_raw, gone_raw, data_raw = records(memoryview(raw), len(raw), PRECOPY_TAGS)
    if len(meta_raw) > 4096:
        raise refuse("a pre-copy section's META is too large")
    try:
        meta = json.loads(bytes(meta_raw))
    except ValueError:
        raise refuse("META record is not JSON") from None
    _check_precopy_meta(meta)
    if len(sent_raw) % 8 or len(gone_raw) % 8 or len(data_raw) % (8 + PAGE_SIZE):
        raise refuse("a record's length is not a whole number of items")
    sent, gone = array("Q"), array("Q")
    sent.frombytes(sent_raw)
    gone.frombytes(gone_raw)
    if len(sent) + len(gone) > SECTION_PAGES:
        raise refuse(f"a section of more than {SECTION_PAGES} pages")
    _ascending(sent, "SENT")
    _ascending(gone, "GONE")
    if set(sent) & set(gone) or any(g >= 1 << 52 for g in sent) or any(g >= 1 << 52 for g in gone):
        raise refuse("a GFN both sent and gone, or beyond 2^52")
    pages: dict[int, memoryview] = {}
    previous = -1
    members = set(sent)
    for i in range(0, len(data_raw), 8 + PAGE_SIZE):
        (gfn,) = REF.unpack_from(data_raw, i)
        if gfn <= previous or gfn not in members:
            raise refuse("DATA names a page not in SENT, or out of order")
        previous = gfn
        pages[gfn] = data_raw[i + 8 : i + 8 + PAGE_SIZE]
    return Precopy(meta, sent.tolist(), gone.tolist(), pages)


def _ascending(values: Iterable[int], what: str) -> None:
    previous = -1
    for value in values:
        if value <= previous:
            raise refuse(f"{what} not strictly ascending")
        previous = value


def check_int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:
        raise refuse(f"{what} is not an integer in [{low}, {high})")
    return value


def _check_precopy_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or not {"round", "left"} <= set(meta) <= {"round", "left", "create"}:
        raise refuse("a pre-copy META is {round, left[, create]}")
    check_int(meta["round"], "round", 1, 1 << 32), check_int(meta["left"], "left", 0, 1 << 40)
    create = meta.get("create")
    if create is not None:
        keys = {"name", "pages", "max_pages", "max_mappings", "vcpus", "pin"}
        if not isinstance(create, dict) or set(create) != keys:
            raise refuse(f"create must be a map of exactly {sorted(keys)}")
        if not isinstance(create["name"], str) or len(create["name"]) > 64:
            raise refuse("domain name is not a string of at most 64 characters")
        check_int(create["pages"], "pages", 0, 1 << 40), check_int(create["max_pages"], "max_pages", 0, 1 << 40)
        check_int(create["max_mappings"], "max_mappings", 0, (1 << 32) + 1)
        vcpus = check_int(create["vcpus"], "vcpus", 1, 65)
        if not isinstance(create["pin"], list) or len(create["pin"]) != vcpus:
            raise refuse("pin must be one per vCPU")
        for p in create["pin"]:
            check_int(p, "pin", 0, 1 << 16)
