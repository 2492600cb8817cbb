"""The save image: header, typed records and a SHA-256 trailer (PROTOCOL.md, "Save images").

Layout (integers little-endian)::

    header   magic "XNMUSAVE" | u32 version (1) | u32 flags (0) | u64 body length | u64 0
    body     records, each  u8[4] tag | u32 0 | u64 length | length bytes
             META (JSON), P2M  (u64 GFNs), DATA (u64 frame ref + 4096 bytes each),
             IOMM (24 bytes each: u64 BFN, u64 frame ref, u8 kind, u8 perms, u8[6] 0)
    trailer  SHA-256 of header and body

A *frame ref* names a frame without its machine number: a GFN, or ``HELD | i`` for the
``i``-th frame the domain still holds through its own ``map_page`` entries after ballooning it
out. ``decode`` checks everything that does not depend on the host restoring it: the framing,
the checksum, every JSON field's type and range, and every cross-reference between records.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import struct
from array import array
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from xenemu.core.errors import EBADMSG, EINVAL, EPROTONOSUPPORT, HypercallError
from xenemu.core.iommu.device import normalise_bdf
from xenemu.core.iommu.entries import RW, Kind
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.frames import PAGE_SIZE
from xenemu.core.memory.leaves import LEAF_SHIFT

#: Pages (or parts) hashed between two pauses: 4 MiB, about 4 ms of SHA-256.
HASH_SLICE = 1024
MAGIC = b"XNMUSAVE"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
RECORD = struct.Struct("<4sIQ")
ENTRY = struct.Struct("<QQBB6x")
REF = struct.Struct("<Q")
DIGEST = 32
#: A frame ref with this bit names a held frame by index, not a GFN.
HELD = 1 << 63
TAGS = (b"META", b"P2M ", b"DATA", b"IOMM")
#: Header flag of a device model's image (``dm.py``): two more records follow its own four,
#: ``DMSV`` (JSON: its IOREQ servers) and ``FMAP`` (its foreign and scratch entries). (Bits 0
#: and 1 are a live migration's section kinds, ``stream.PRECOPY`` and ``FINAL``.)
DEVICE_MODEL = 4
DM_TAGS = (b"DMSV", b"FMAP")
#: The JSON record is small (no list in it grows with memory but the leaf lists).
MAX_META = 16 << 20
#: Kinds a save image may carry: the others (foreign, scratch, grant, doorbell) are refused at save.
SAVED_KINDS = {Kind.DEFAULT, Kind.MAP, Kind.MAP_NOREF, Kind.RMRR}
#: Empty p2m leaves (GFN ranges ballooned out whole) an image may carry beyond one per page.
SPARE_P2M_LEAVES = 1024


def refuse(message: str) -> HypercallError:
    return HypercallError(-EBADMSG, f"corrupt save image: {message}")


@dataclass
class Image:
    """A saved domain, by GFN and BFN: nothing in it names a machine frame or a domid of its host."""

    meta: dict[str, Any]
    #: GFNs the domain had populated, ascending.
    gfns: list[int] = field(default_factory=list)
    #: (frame ref, 4096 bytes) of every frame with contents, by ref.
    pages: list[tuple[int, bytes | memoryview]] = field(default_factory=list)
    #: (BFN, frame ref, kind, perms) of every present entry of its written leaves, by BFN.
    entries: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: A migration's last section only: what the receiver needs beyond a save (live.py).
    live: dict[str, Any] | None = None
    #: A device model's image only: the payloads of its ``DM_TAGS`` records (``dm.py`` reads them).
    dm_records: list[bytes | memoryview] | None = None


#: Header flags of a live migration's last section (``live.py``): a save image whose DATA holds
#: only the pages dirtied since the pre-copy sections (zero pages included), and whose META
#: carries a ``live`` field. A plain save image has no flag.
FINAL = 2


def encode_steps(image: Image, flags: int = 0) -> Generator[str, None, bytes]:
    """The image's bytes, hashed a slice at a time with a pause between slices (a large guest's
    image takes a while to sum, and the daemon serves others meanwhile). A device model's image
    (``dm_records``) gets the ``DEVICE_MODEL`` flag and its two records."""
    fields = image.meta if image.live is None else image.meta | {"live": image.live}
    meta = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    data: list[bytes | memoryview] = []
    for ref, page in image.pages:
        data += (REF.pack(ref), page)
    entries = b"".join(ENTRY.pack(bfn, ref, kind, perms) for bfn, ref, kind, perms in image.entries)
    records: tuple[list[bytes | memoryview], ...] = ([meta], [array("Q", image.gfns).tobytes()], data, [entries])
    lengths: tuple[int, ...] = (len(meta), len(records[1][0]), len(image.pages) * (8 + PAGE_SIZE), len(entries))
    tags: tuple[bytes, ...] = TAGS
    if image.dm_records is not None:
        tags, flags = TAGS + DM_TAGS, flags | DEVICE_MODEL
        records += tuple([r] for r in image.dm_records)
        lengths += tuple(len(r) for r in image.dm_records)
    return (yield from frame_steps(flags, tags, records, lengths))


def frame_steps(
    flags: int, tags: tuple[bytes, ...], records: Sequence[list[bytes | memoryview]], lengths: Sequence[int]
) -> Generator[str, None, bytes]:
    """Header, ``records`` (each a list of parts, ``lengths`` their sizes) under ``tags``, and the
    SHA-256 trailer, summed a slice at a time with a pause between slices: every image and every
    migration section is framed here."""
    body = sum(lengths) + len(tags) * RECORD.size
    parts: list[bytes | memoryview] = [HEADER.pack(MAGIC, VERSION, flags, body, 0)]
    for tag, payload, length in zip(tags, records, lengths, strict=True):
        parts.append(RECORD.pack(tag, 0, length))
        parts += payload
    digest = hashlib.sha256()
    for done, part in enumerate(parts):
        digest.update(part)
        if done % HASH_SLICE == HASH_SLICE - 1:
            yield PREEMPT
    parts.append(digest.digest())
    return b"".join(parts)


def encode(image: Image, flags: int = 0) -> bytes:
    """``encode_steps`` run to its end (tests and scripts)."""
    steps = encode_steps(image, flags)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            out: bytes = stop.value
            return out


def checksum_steps(raw: bytes | bytearray, flags: int = 0) -> Generator[str, None, None]:
    """The framing and the trailer's SHA-256 checked a slice at a time, pausing between slices."""
    total = _whole(raw, flags)
    view = memoryview(raw)
    digest = hashlib.sha256()
    step = HASH_SLICE * PAGE_SIZE
    for at in range(0, total - DIGEST, step):
        digest.update(view[at : min(at + step, total - DIGEST)])
        yield PREEMPT
    if digest.digest() != view[-DIGEST:]:
        raise refuse("checksum mismatch")


def _whole(raw: bytes | bytearray, flags: int = 0) -> int:
    total = declared_length(raw, flags)
    if len(raw) != total:
        raise refuse(f"{'truncated' if len(raw) < total else 'trailing bytes'}: {len(raw)} of {total} bytes")
    return total


def header_flags(head: bytes | bytearray) -> int:
    """The header's flags (after the magic and version are checked): which kind of image."""
    declared_length(head, None)
    return int(HEADER.unpack_from(head)[2])


def declared_length(head: bytes | bytearray, flags: int | None = 0) -> int:
    """The whole image's length from its header (what a receiver may check before the rest);
    ``flags``: the header flags this reader expects (None: any)."""
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise HypercallError(-EINVAL, "not a xenemu save image (bad magic)")
    expected = flags
    _, version, got_flags, body, _ = HEADER.unpack_from(head)
    if version != VERSION:
        raise HypercallError(-EPROTONOSUPPORT, f"save image version {version}; this xenemu reads version {VERSION}")
    if expected is not None and got_flags != expected:
        if (got_flags ^ expected) == DEVICE_MODEL:
            raise HypercallError(
                -EINVAL,
                "a device model's image: it is restored with its guest's (restore_domain dm_images)"
                if got_flags & DEVICE_MODEL
                else "not a device model's image (save its guest with with_dm)",
            )
        raise refuse(f"unexpected header flags {got_flags:#x}")
    return int(HEADER.size + body + DIGEST)


def records(view: memoryview, total: int, tags: tuple[bytes, ...]) -> list[memoryview]:
    """The payloads of an image's (or a migration section's) records, which must be exactly
    ``tags`` in order, filling the body between header and trailer."""
    payloads: list[memoryview] = []
    at, end = HEADER.size, total - DIGEST
    for tag in tags:
        if at + RECORD.size > end:
            raise refuse(f"record {tag.decode()!r} missing")
        got, zero, length = RECORD.unpack_from(view, at)
        if got != tag or zero:
            raise refuse(f"record {tag.decode()!r} expected")
        at += RECORD.size
        if at + length > end:
            raise refuse(f"record {tag.decode()!r} overruns the image")
        payloads.append(view[at : at + length])
        at += length
    if at != end:
        raise refuse("bytes after the last record")
    return payloads


def decode(raw: bytes | bytearray, summed: bool = False, flags: int = 0) -> Image:
    """Check and parse an image; ``-EINVAL``, ``-EPROTONOSUPPORT`` or ``-EBADMSG`` saying why.
    ``summed``: ``checksum_steps`` has checked the framing and the checksum already. With
    ``FINAL`` in ``flags``, META's ``live`` field is taken out before META is checked (the
    caller checks it) and kept in ``Image.live``. With ``DEVICE_MODEL``, the ``DM_TAGS`` records
    are kept in ``Image.dm_records`` for ``dm.decode``, which checks them and the references."""
    total = _whole(raw, flags)
    view = memoryview(raw)
    if not summed:
        for _ in checksum_steps(raw, flags):
            pass
    payloads = records(view, total, TAGS + (DM_TAGS if flags & DEVICE_MODEL else ()))
    meta_raw, gfn_raw, data_raw, entry_raw = payloads[: len(TAGS)]
    if len(meta_raw) > MAX_META:
        raise refuse("META record too large")
    try:
        meta = json.loads(bytes(meta_raw))
    except ValueError:
        raise refuse("META record is not JSON") from None
    live = meta.pop("live", None) if flags & FINAL and isinstance(meta, dict) else None
    if flags & FINAL and not isinstance(live, dict):
        raise refuse("a migration's last section has no live field")
    check_meta(meta)
    if len(gfn_raw) % 8 or len(data_raw) % (8 + PAGE_SIZE) or len(entry_raw) % ENTRY.size:
        raise refuse("a record's length is not a whole number of items")
    gfns = array("Q")
    gfns.frombytes(gfn_raw)
    pages: list[tuple[int, bytes | memoryview]] = [
        (REF.unpack_from(data_raw, i)[0], data_raw[i + 8 : i + 8 + PAGE_SIZE])  # views: no copy yet
        for i in range(0, len(data_raw), 8 + PAGE_SIZE)
    ]
    entries = [ENTRY.unpack_from(entry_raw, i) for i in range(0, len(entry_raw), ENTRY.size)]
    image = Image(meta, gfns.tolist(), pages, [(int(b), int(r), int(k), int(p)) for b, r, k, p in entries])
    image.live = live
    if flags & DEVICE_MODEL:
        image.dm_records = list(payloads[len(TAGS) :])  # dm.decode checks them and the references
    else:
        check_references(image)
    return image


# -- the checks ----------------------------------------------------------------------------------------
def _int(value: Any, what: str, low: int = 0, high: int = 1 << 64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise refuse(f"{what} is not an integer in [{low}, {high})")
    return value


def _keys(value: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise refuse(f"{what} must be a map of exactly {sorted(keys)}")
    return value


def _ints(value: Any, what: str, high: int = 1 << 64) -> list[int]:
    if not isinstance(value, list):
        raise refuse(f"{what} is not a list")
    return [_int(v, what, 0, high) for v in value]


def _ascending(values: list[int], what: str) -> None:
    if not all(map(operator.lt, values, itertools.islice(values, 1, None))):  # C speed: lists of every GFN
        raise refuse(f"{what} not strictly ascending")


def check_meta(meta: Any) -> None:
    """Every field of META: present, of its type, in its range (no unknown field)."""
    meta = _keys(meta, "META", {"domain", "its", "gic", "devices", "iommu", "p2m_leaves", "held", "grants"})
    gic = _keys(meta["gic"], "gic", {"window", "pits"})
    _int(gic["window"], "GIC window"), _int(gic["pits"], "pITS count", 0, 256)
    dom = _keys(meta["domain"], "domain", {"type", "name", "pages", "max_pages", "max_mappings", "servers_created"})
    if dom["type"] != "hvm":
        raise refuse("only HVM domains are saved")
    if not isinstance(dom["name"], str) or len(dom["name"]) > 64:
        raise refuse("domain name is not a string of at most 64 characters")
    _int(dom["pages"], "pages", 0, 1 << 40)
    _int(dom["max_pages"], "max_pages", 0, 1 << 40)
    _int(dom["max_mappings"], "max_mappings", 0, (1 << 32) + 1)
    _int(dom["servers_created"], "servers_created", 0, 257)
    its = _keys(meta["its"], "its", {"vcpus", "pin", "propbaser", "redists", "vits", "in_service"})
    vcpus = _int(its["vcpus"], "vcpus", 1, 65)
    if len(_ints(its["pin"], "pin", 1 << 16)) != vcpus or not isinstance(its["redists"], list):
        raise refuse("pin and redistributors must be one per vCPU")
    _int(its["propbaser"], "propbaser")
    if len(its["redists"]) != vcpus:
        raise refuse("pin and redistributors must be one per vCPU")
    for redist in its["redists"]:
        r = _keys(redist, "redistributor", {"enable_lpis", "pendbaser", "ptz"})
        if not isinstance(r["enable_lpis"], bool) or not isinstance(r["ptz"], bool):
            raise refuse("redistributor flags must be booleans")
        _int(r["pendbaser"], "pendbaser")
    if not isinstance(meta["devices"], list) or len(meta["devices"]) > 256:
        raise refuse("devices is not a list of at most 256")
    bdfs = []
    for device in meta["devices"]:
        d = _keys(device, "device", {"bdf", "rmrr", "its"})
        if not isinstance(d["bdf"], str) or len(d["bdf"]) > 16:
            raise refuse("a device's BDF is not a short string")
        try:
            bdfs.append(normalise_bdf(d["bdf"]))
        except ValueError:
            raise refuse(f"bad BDF {d['bdf']!r}") from None
        if not isinstance(d["rmrr"], list) or len(d["rmrr"]) > 64:
            raise refuse("a device's RMRR regions are not a list of at most 64")
        total = 0
        for region in d["rmrr"]:
            if not isinstance(region, list) or len(region) != 2:
                raise refuse("an RMRR region is not [first, count]")
            start, count = _int(region[0], "RMRR start", 0, 1 << 40), _int(region[1], "RMRR count", 1, 4097)
            total += count
            if start + count > 1 << 40 or total > 4096:
                raise refuse("RMRR regions beyond 4,096 frames or frame 2^40")
    if len(set(bdfs)) != len(bdfs):
        raise refuse("a device appears twice")
    iommu = meta["iommu"]
    if (iommu is None) != (not bdfs):
        raise refuse("an IOMMU context goes with assigned devices, and only with them")
    if iommu is not None:
        _keys(iommu, "iommu", {"leaves", "sparse", "emptied", "flushes", "fault_count"})
        _ascending(_ints(iommu["leaves"], "leaves", 1 << (64 - LEAF_SHIFT)), "leaves")
        _ascending(_ints(iommu["sparse"], "sparse leaves", 1 << (64 - LEAF_SHIFT)), "sparse leaves")
        if not set(iommu["sparse"]) <= set(iommu["leaves"]) or not isinstance(iommu["emptied"], bool):
            raise refuse("sparse leaves must be written leaves")
        flushes = _keys(iommu["flushes"], "flushes", {"added", "modified"})
        _int(flushes["added"], "flushes"), _int(flushes["modified"], "flushes"), _int(iommu["fault_count"], "faults")
    _ascending(_ints(meta["p2m_leaves"], "p2m leaves", 1 << (64 - LEAF_SHIFT)), "p2m leaves")
    _int(meta["held"], "held frames", 0, 1 << 40)
    grants = _keys(meta["grants"], "grants", {"entries", "next_handle"})
    _int(grants["next_handle"], "next_handle", 0, 4096)
    if not isinstance(grants["entries"], list) or len(grants["entries"]) > 1024:
        raise refuse("grant entries are not a list of at most 1,024")
    refs = []
    for entry in grants["entries"]:
        if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[3], bool):
            raise refuse("a grant entry is not [ref, domid, gfn, readonly]")
        refs.append(_int(entry[0], "grant ref", 0, 1024))
        _int(entry[1], "grant domid", 0, 1 << 16), _int(entry[2], "grant frame", 0, 1 << 32)
    _ascending(refs, "grant refs")


def rmrr_frames(meta: dict[str, Any]) -> set[int]:
    return {start + i for d in meta["devices"] for start, count in d["rmrr"] for i in range(count)}


def check_references(image: Image, foreign: int = 0) -> None:
    """Every record agrees with META and with the others: counts, order, what each ref names,
    and bounds that keep a restore's work proportional to the domain it builds.  ``foreign``:
    a device model's foreign and scratch entries (``FMAP``), which count as its mappings."""
    meta, dom = image.meta, image.meta["domain"]
    gfns, held = image.gfns, meta["held"]
    if len(gfns) != dom["pages"]:
        raise refuse(f"{len(gfns)} GFNs for {dom['pages']} pages")
    _ascending(gfns, "GFNs")
    populated = set(gfns)
    p2m_leaves = meta["p2m_leaves"]
    if not {g >> LEAF_SHIFT for g in gfns} <= set(p2m_leaves) or len(p2m_leaves) > len(gfns) + SPARE_P2M_LEAVES:
        raise refuse("p2m leaves do not cover its GFNs, or are too many")

    def names_a_frame(ref: int) -> bool:
        return (ref - HELD < held) if ref & HELD else ref in populated

    refs = [ref for ref, _ in image.pages]
    _ascending(refs, "DATA frames")
    if not all(names_a_frame(ref) for ref in refs):
        raise refuse("DATA names a frame the domain does not have")
    iommu = meta["iommu"]
    if iommu is None:
        if image.entries or held:
            raise refuse("IOMMU entries or held frames without an IOMMU context")
        return
    leaves, rmrr = set(iommu["leaves"]), rmrr_frames(meta)
    mappings = sum(1 for e in image.entries if e[2] in (Kind.MAP, Kind.MAP_NOREF)) + foreign
    bound = len(p2m_leaves) + 2 * mappings + len({f >> LEAF_SHIFT for f in rmrr}) + SPARE_P2M_LEAVES
    if len(leaves) > bound or mappings > dom["max_mappings"]:
        raise refuse("more page-table leaves or mappings than its domain could hold")
    _ascending([e[0] for e in image.entries], "IOMMU entries")
    held_by_map: set[int] = set()
    seen_rmrr = set()
    for bfn, ref, kind, perms in image.entries:
        if bfn >> LEAF_SHIFT not in leaves or kind not in SAVED_KINDS or perms > RW:
            raise refuse(f"IOMMU entry at BFN {bfn:#x}: not in a written leaf, or a bad kind or permission")
        if kind == Kind.RMRR:
            if ref != bfn or bfn not in rmrr or perms != RW:
                raise refuse(f"RMRR entry at BFN {bfn:#x} is not one of its devices' identity entries")
            seen_rmrr.add(bfn)
        elif not names_a_frame(ref) or (kind == Kind.DEFAULT and (ref != bfn or perms != RW)):
            raise refuse(f"IOMMU entry at BFN {bfn:#x} names no frame of the domain, or is a bad default")
        elif kind == Kind.MAP and ref & HELD:
            held_by_map.add(ref - HELD)
    if seen_rmrr != rmrr:
        raise refuse("its devices' RMRR entries are missing")
    if len(held_by_map) != held:
        raise refuse("a held frame that no map_page entry holds")
