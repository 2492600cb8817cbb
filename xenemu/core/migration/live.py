"""Live migration: pre-copy rounds under log-dirty mode, then a short stop-and-copy.

The source sends a domain's memory while it runs, in *sections* of at most ``SECTION_PAGES``
pages; every write made meanwhile is logged, so a page written after it was copied is sent again
in the next round. Two logs feed a round, and both are read and cleared when it begins:

* the p2m's log (``P2M.log``): the guest's CPU writes (``guest_write``) and every populate and
  depopulate of a GFN;
* the IOMMU entries' dirty bits (``IommuContext.dirty``, as iommufd's dirty tracking): device
  DMA writes, through the domain's own context or an emulator's foreign mapping of its frames.

When a round is small enough (the toolstack decides: ``xenemu migrate``), the domain is stopped
(``Host.suspended``: its calls, requests naming it and DMA to its frames are ``-EBUSY``), and its
last section is a save image (``save.snapshot``) whose DATA holds only the pages dirtied since the
pre-copy sections. The receiver builds the domain as sections arrive: created at the first one
(hidden behind ``busy_ops`` and ``Host.suspended``), its GFNs populated and written section by
section, and completed by the last one with everything ``restore`` puts back; it then takes the
source domain's token, so the guest reconnects to its new host without a new secret. The source
destroys its copy once the receiver has it (``finish``); before that, the migration may be
abandoned and the domain runs on where it was.

Sections are the save format (``image.py``): header, typed records, SHA-256 trailer. A pre-copy
section has header flags ``PRECOPY`` and records META (JSON), SENT (u64 GFNs whose pages it sends;
a sent GFN without a DATA page is a zero page), GONE (u64 GFNs no longer populated) and DATA; the
last has flags ``FINAL`` and is a save image with META's ``live`` field.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

from xenemu.core.errors import EBUSY, EEXIST, EINVAL, ENOENT, ENOMEM, EOPNOTSUPP, EPERM, ESRCH, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.frames import PAGE_SIZE
from xenemu.core.migration import restore as restoring
from xenemu.core.migration import vits
from xenemu.core.migration.image import (
    DIGEST,
    FINAL,
    HASH_SLICE,
    HEADER,
    HELD,
    MAGIC,
    RECORD,
    REF,
    VERSION,
    Image,
    checksum_steps,
    decode,
    encode_steps,
    refuse,
)
from xenemu.core.migration.save import ZERO_PAGE, snapshot

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
    todo: list[int]
    at: int = 0
    #: Rounds begun (the first sends every populated page).
    round: int = 1
    #: Pages the current round found dirty when it began (the first: every page).
    dirtied: int = 0
    #: Pages sent so far (zero pages included, as SENT without DATA), and of them zero pages.
    sent: int = 0
    zero: int = 0
    suspended: bool = False


@dataclass
class Incoming:
    """A domain being received: created at the first section, completed by the last."""

    dom: Domain
    sections: int = 0
    pages: int = 0


@dataclass
class Migrations:
    """A host's migrations, out and in, by id (ids rise and are never reused)."""

    outgoing: dict[int, Outgoing] = field(default_factory=dict)
    incoming: dict[int, Incoming] = field(default_factory=dict)
    next_id: int = 1

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


# -- the source ---------------------------------------------------------------------------------
def _log_on(host: Host, dom: Domain) -> None:
    dom.p2m.log = set()
    dom.p2m.log_limit = max(dom.pages, dom.max_pages) + LOG_SLACK
    dom.p2m.log_overflowed = False
    host.iommu.dirty_tracking_on()


def _log_off(host: Host, out: Outgoing) -> None:
    out.dom.p2m.log = None
    host.iommu.dirty_tracking_off()


def begin(host: Host, migrations: Migrations, domid: int) -> Generator[str, None, int]:
    """Start migrating ``domid`` out: log-dirty on, the first round is every populated page.
    What could never be migrated is refused now; what must first let go, at ``suspend``."""
    dom = host.domain(domid)
    if dom.is_hwdom:
        raise HypercallError(-EPERM, "the hardware domain cannot be migrated")
    if not dom.is_hvm:
        raise HypercallError(-EOPNOTSUPP, "a PV domain's GFNs are machine frames: only HVM domains migrate")
    if dom.target is not None:
        raise HypercallError(-EOPNOTSUPP, f"d{domid} is a device model: it migrates with its guest")
    _prune(host, migrations)
    if any(o.dom is dom for o in migrations.outgoing.values()):
        raise HypercallError(-EBUSY, f"d{domid} is already being migrated")
    while len(migrations.outgoing) >= MAX_MIGRATIONS:
        abandon(host, migrations, min(migrations.outgoing))
    _log_on(host, dom)
    out = Outgoing(dom, [])
    ident = migrations._new_id()
    migrations.outgoing[ident] = out
    try:
        todo: list[int] = []
        for count, gfn in enumerate(dom.p2m.keys()):
            todo.append(gfn)
            if count % (16 * COPY_SLICE) == 16 * COPY_SLICE - 1:
                yield PREEMPT
                if host.domains.get(domid) is not dom:
                    raise HypercallError(-ESRCH, f"d{domid} was destroyed")
    except BaseException:
        if migrations.outgoing.pop(ident, None) is not None:
            _log_off(host, out)
        raise
    # GFNs populated during the pauses are in the log too: sent again next round, harmlessly.
    out.todo, out.dirtied = todo, len(todo)
    return ident


def _prune(host: Host, migrations: Migrations) -> None:
    """Migrations whose domain was destroyed meanwhile end (the toolstack may have died)."""
    for ident, out in list(migrations.outgoing.items()):
        if host.domains.get(out.dom.domid) is not out.dom:
            del migrations.outgoing[ident]
            _log_off(host, out)
    for ident, inc in list(migrations.incoming.items()):
        if host.domains.get(inc.dom.domid) is not inc.dom:
            del migrations.incoming[ident]


def _outgoing(host: Host, migrations: Migrations, ident: int) -> Outgoing:
    out = migrations.outgoing.get(ident)
    if out is not None and host.domains.get(out.dom.domid) is not out.dom:
        del migrations.outgoing[ident]
        _log_off(host, out)
        raise HypercallError(-ESRCH, f"the domain of migration {ident} was destroyed")
    if out is None:
        raise HypercallError(-ENOENT, f"no outgoing migration {ident}")
    return out


def read_dirty(host: Host, dom: Domain) -> set[int]:
    """Read and clear both logs: the GFNs written or changed since they were last read."""
    p2m = dom.p2m
    assert p2m.log is not None
    dirty, p2m.log = p2m.log, set()
    overflowed, p2m.log_overflowed = p2m.log_overflowed, False
    reverse: dict[int, int] | None = None
    for ctx, bfn, mfn in host.iommu.read_dirty(dom.domid):
        if ctx.domid == dom.domid and p2m.get(bfn) == mfn:
            dirty.add(bfn)  # a default entry (1:1) or a map_page at its own GFN
            continue
        if reverse is None:
            reverse = {m: g for g, m in p2m.items()}
        gfn = reverse.get(mfn)
        if gfn is not None:  # else a frame it holds ballooned out: every one goes in the last section
            dirty.add(gfn)
    if overflowed:  # GFNs depopulated meanwhile are not named: the last section's p2m settles them
        dirty |= set(p2m.keys())
    return dirty


def send(
    host: Host, migrations: Migrations, ident: int, max_pages: int
) -> Generator[str, None, tuple[bytes, dict[str, Any]]]:
    """The next pre-copy section: up to ``max_pages`` pages of the current round, copied a
    slice at a time with pauses (a page written after its copy is in the log). A round whose
    pages are all sent is followed by a new one, which begins by reading the logs."""
    out = _outgoing(host, migrations, ident)
    if out.suspended:
        raise HypercallError(-EBUSY, f"migration {ident} is stopped: its last section was taken")
    if not 1 <= max_pages <= SECTION_PAGES:
        raise HypercallError(-EINVAL, f"a section carries 1..{SECTION_PAGES} pages")
    dom, frames = out.dom, host.frames
    first = out.sent == 0 and out.round == 1 and out.at == 0
    if out.at >= len(out.todo):
        out.todo, out.at = sorted(read_dirty(host, dom)), 0
        out.round += 1
        out.dirtied = len(out.todo)
    take = out.todo[out.at : out.at + max_pages]
    out.at += len(take)
    sent, gone = array("Q"), array("Q")
    data: list[bytes] = []
    for done, gfn in enumerate(take):
        if done and not done % COPY_SLICE:
            yield PREEMPT
            if host.domains.get(dom.domid) is not dom:
                raise HypercallError(-ESRCH, f"d{dom.domid} was destroyed")
        mfn = dom.p2m.get(gfn)  # read now: a later change is in the log
        if mfn is None:
            gone.append(gfn)
            continue
        sent.append(gfn)
        page = frames.data.get(mfn)
        if page is None or page == ZERO_PAGE:
            out.zero += 1
        else:
            data += (REF.pack(gfn), bytes(page))
    out.sent += len(sent)
    meta: dict[str, Any] = {"round": out.round, "left": len(out.todo) - out.at}
    if first:
        its = host.its.domains[dom.domid]
        meta["create"] = {
            "name": dom.name,
            "pages": dom.pages,
            "max_pages": dom.max_pages,
            "max_mappings": dom.max_mappings,
            "vcpus": its.vcpus,
            "pin": list(its.pin),
        }
    raw = yield from _encode_precopy(meta, sent, gone, data)
    info = {"round": out.round, "pages": len(sent), "left": meta["left"], "dirtied": out.dirtied, "sent": out.sent}
    return raw, info


def _encode_precopy(
    meta: dict[str, Any], sent: array[int], gone: array[int], data: list[bytes]
) -> Generator[str, None, bytes]:
    payloads: list[list[bytes]] = [
        [json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()],
        [sent.tobytes()],
        [gone.tobytes()],
        data,
    ]
    lengths = [sum(len(p) for p in payload) for payload in payloads]
    body = sum(lengths) + len(PRECOPY_TAGS) * RECORD.size
    parts: list[bytes] = [HEADER.pack(MAGIC, VERSION, PRECOPY, body, 0)]
    for tag, payload, length in zip(PRECOPY_TAGS, payloads, lengths, strict=True):
        parts.append(RECORD.pack(tag, 0, length))
        parts += payload
    digest = hashlib.sha256()
    for done, part in enumerate(parts):
        digest.update(part)
        if done % HASH_SLICE == HASH_SLICE - 1:
            yield PREEMPT
    parts.append(digest.digest())
    return b"".join(parts)


def suspend(host: Host, migrations: Migrations, ident: int) -> Generator[str, None, tuple[bytes, dict[str, Any]]]:
    """Stop the domain and take its last section: a save image of everything, whose pages are
    those dirtied since the pre-copy sections. If it cannot be saved now (an operation in
    flight, a backend still mapping its grants, ...), it runs on and the error says why; the
    migration stays open (more pre-copy, then another try)."""
    out = _outgoing(host, migrations, ident)
    dom = out.dom
    if out.suspended:
        raise HypercallError(-EBUSY, f"migration {ident} is stopped already")
    host.suspended.add(dom.domid)
    try:
        dirty = read_dirty(host, dom) | set(out.todo[out.at :])
        image = snapshot(host, dom.domid, dirty)
    except BaseException:
        host.suspended.discard(dom.domid)
        raise
    out.suspended = True
    final_round = out.round if out.at < len(out.todo) else out.round + 1  # a round begun ends here
    out.todo, out.at = [], 0
    sent = sum(1 for ref, _ in image.pages if not ref & HELD)
    out.sent += sent
    out.round = final_round
    image.live = {"token": dom.token, "round": final_round}
    raw = yield from encode_steps(image, FINAL)
    return raw, {"round": final_round, "pages": sent, "sent": out.sent, "dirtied": len(dirty)}


def finish(host: Host, migrations: Migrations, ident: int, done: bool) -> Generator[str, None, None]:
    """``done``: the receiver has the domain, so the source's copy is destroyed (emulators'
    foreign mappings of its frames get ``IOREQ_TYPE_INVALIDATE`` first, as on any destroy).
    Otherwise the migration is abandoned and the domain runs on here."""
    out = _outgoing(host, migrations, ident)
    if done and not out.suspended:
        raise HypercallError(-EINVAL, f"migration {ident} has not taken its last section")
    del migrations.outgoing[ident]
    _log_off(host, out)
    host.suspended.discard(out.dom.domid)
    if done:
        yield from host.destroying(out.dom.domid)


def abandon(host: Host, migrations: Migrations, ident: int) -> None:
    """End an outgoing migration without destroying anything: the domain runs on."""
    out = migrations.outgoing.pop(ident)
    _log_off(host, out)
    host.suspended.discard(out.dom.domid)


# -- the receiver -------------------------------------------------------------------------------
@dataclass
class Precopy:
    meta: dict[str, Any]
    sent: list[int]
    gone: list[int]
    pages: dict[int, memoryview]


def decode_precopy(raw: bytes | bytearray) -> Precopy:
    """Check and parse a pre-copy section (its checksum already summed)."""
    view = memoryview(raw)
    total = len(raw)
    at, end = HEADER.size, total - DIGEST
    payloads: list[memoryview] = []
    for tag in PRECOPY_TAGS:
        if at + RECORD.size > end:
            raise refuse(f"record {tag.decode()!r} missing")
        got, zero, length = RECORD.unpack_from(view, at)
        if got != tag or zero:
            raise refuse(f"record {tag.decode()!r} expected")
        at += RECORD.size
        if at + length > end:
            raise refuse(f"record {tag.decode()!r} overruns the section")
        payloads.append(view[at : at + length])
        at += length
    if at != end:
        raise refuse("bytes after the last record")
    meta_raw, sent_raw, gone_raw, data_raw = payloads
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


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:
        raise refuse(f"{what} is not an integer in [{low}, {high})")
    return value


def _check_precopy_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or not {"round", "left"} <= set(meta) <= {"round", "left", "create"}:
        raise refuse("a pre-copy META is {round, left[, create]}")
    _int(meta["round"], "round", 1, 1 << 32), _int(meta["left"], "left", 0, 1 << 40)
    create = meta.get("create")
    if create is not None:
        keys = {"name", "pages", "max_pages", "max_mappings", "vcpus", "pin"}
        if not isinstance(create, dict) or set(create) != keys:
            raise refuse(f"create must be a map of exactly {sorted(keys)}")
        if not isinstance(create["name"], str) or len(create["name"]) > 64:
            raise refuse("domain name is not a string of at most 64 characters")
        _int(create["pages"], "pages", 0, 1 << 40), _int(create["max_pages"], "max_pages", 0, 1 << 40)
        _int(create["max_mappings"], "max_mappings", 0, (1 << 32) + 1)
        vcpus = _int(create["vcpus"], "vcpus", 1, 65)
        if not isinstance(create["pin"], list) or len(create["pin"]) != vcpus:
            raise refuse("pin must be one per vCPU")
        for p in create["pin"]:
            _int(p, "pin", 0, 1 << 16)


def receive(
    host: Host, migrations: Migrations, raw: bytes | bytearray, ident: int
) -> Generator[str, None, dict[str, Any]]:
    """Apply one section (``ident`` 0: the first, which creates the domain). A failure destroys
    what was received: the migration is over on this side (the source's domain runs on)."""
    flags = _flags(raw)
    yield from checksum_steps(raw, flags)
    _prune(host, migrations)
    if flags == PRECOPY:
        section = decode_precopy(raw)
        if ident == 0:
            ident = yield from _create(host, migrations, section)
        inc = _incoming(host, migrations, ident)
        try:
            yield from _apply_precopy(host, inc, section)
        except BaseException:
            _drop(host, migrations, ident)
            raise
        return {"ret": 0, "incoming": ident, "domid": inc.dom.domid, "pages": inc.dom.pages}
    image = decode(raw, summed=True, flags=FINAL)
    inc = _incoming(host, migrations, ident)
    try:
        yield from _complete(host, inc, image)
    except BaseException:
        _drop(host, migrations, ident)
        raise
    del migrations.incoming[ident]
    return {"ret": 0, "incoming": ident, "domid": inc.dom.domid, "token": inc.dom.token, "pages": inc.dom.pages}


def _flags(raw: bytes | bytearray) -> int:
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise HypercallError(-EINVAL, "not a xenemu migration section (bad magic)")
    flags = int(HEADER.unpack_from(raw)[2])
    if flags not in (PRECOPY, FINAL):
        raise HypercallError(-EINVAL, "a save image, not a migration section: use restore_domain")
    return flags


def _incoming(host: Host, migrations: Migrations, ident: int) -> Incoming:
    inc = migrations.incoming.get(ident)
    if inc is None:
        raise HypercallError(-ENOENT, f"no incoming migration {ident}")
    return inc


def _drop(host: Host, migrations: Migrations, ident: int) -> None:
    """What was received goes: the half-built domain is destroyed."""
    inc = migrations.incoming.pop(ident, None)
    if inc is not None and host.domains.get(inc.dom.domid) is inc.dom:
        host.destroy_domain(inc.dom.domid)


def _create(host: Host, migrations: Migrations, section: Precopy) -> Generator[str, None, int]:
    create = section.meta.get("create")
    if create is None:
        raise refuse("the first section of a migration does not say what to create")
    frames = host.frames
    if create["pages"] > frames.nr_free or create["max_pages"] > frames.nr_frames:
        raise HypercallError(
            -ENOMEM,
            f"host too small: the domain has {create['pages']} pages ({frames.nr_free} free here)"
            f" and max_pages {create['max_pages']} ({frames.nr_frames} frames here)",
        )
    if any(p >= host.options.its_cpus for p in create["pin"]):
        raise HypercallError(-EINVAL, f"a vCPU is pinned beyond this host's {host.options.its_cpus} CPUs")
    while len(migrations.incoming) >= MAX_MIGRATIONS:
        _drop(host, migrations, min(migrations.incoming))
    name = create["name"]
    dom = yield from host.creating(
        "hvm", 0, None, name, create["max_mappings"], create["vcpus"], create["pin"], create["max_pages"]
    )
    dom.name = (name + "--incoming")[:64]  # as xl shows a domain being received
    dom.busy_ops += 1  # its own calls are refused; nobody has its token
    host.suspended.add(dom.domid)  # nor can a request name it (the toolstack may destroy it)
    ident = migrations._new_id()
    migrations.incoming[ident] = Incoming(dom)
    return ident


def _apply_precopy(host: Host, inc: Incoming, section: Precopy) -> Generator[str, None, None]:
    dom, frames = inc.dom, host.frames
    for gfn in section.gone:
        mfn = dom.p2m.pop(gfn)
        if mfn is not None:
            frames.unpopulate(mfn)  # nothing else can hold a frame of a domain being received
            dom.pages -= 1
    for done, gfn in enumerate(section.sent):
        if done and not done % COPY_SLICE:
            yield PREEMPT
            if host.domains.get(dom.domid) is not dom:
                raise HypercallError(-ESRCH, "the domain being received was destroyed")
        mfn = dom.p2m.get(gfn)
        if mfn is None:
            if dom.pages >= dom.max_pages:
                raise HypercallError(-ENOMEM, f"the incoming domain would exceed its max_pages {dom.max_pages}")
            mfn = frames.allocate(dom.domid)
            if mfn is None:
                raise HypercallError(-ENOMEM, "frames ran out while the domain was received")
            dom.p2m[gfn] = mfn
            dom.pages += 1
        page = section.pages.get(gfn)
        if page is not None:
            frames.write(mfn, 0, page)
        else:
            frames.data.pop(mfn, None)  # a zero page
    inc.sections += 1


def _complete(host: Host, inc: Incoming, image: Image) -> Generator[str, None, None]:
    """The last section: the p2m made what the source's was, the dirty pages written, then
    everything else as ``restore`` puts it back; the domain takes its token and runs."""
    dom, frames, live = inc.dom, host.frames, image.live
    assert live is not None
    token = live.get("token")
    if set(live) != {"token", "round"} or not isinstance(token, str) or len(token) != 32:
        raise refuse("live must be {token, round}")
    _int(live["round"], "round", 1, 1 << 32)
    saved = image.meta["domain"]
    if saved["max_mappings"] != dom.max_mappings or image.meta["its"]["vcpus"] != host.its.domains[dom.domid].vcpus:
        raise refuse("the last section does not describe the domain the first one created")
    if any(other.token == token for other in host.domains.values()):
        raise HypercallError(-EEXIST, "a domain here already has that token")
    have = dom.p2m.gfns()
    missing: list[int] = []
    extra: list[int] = []
    if have != image.gfns:  # the pre-copy sections left it as the source's (the common case)
        wanted, present = set(image.gfns), set(have)
        missing, extra = sorted(wanted - present), sorted(present - wanted)
    need = len(missing) + image.meta["held"]
    if need > frames.nr_free + len(extra) or saved["max_pages"] > frames.nr_frames:
        raise HypercallError(-ENOMEM, "host too small for the domain's last pages")
    restoring.check_devices(host, image)
    if image.meta["devices"] and not host.options.iommu:
        raise HypercallError(-EOPNOTSUPP, "no IOMMU on this host: an HVM domain cannot be given its devices")
    vits.check(image.meta)
    vits.check_host(host, image.meta)
    for gfn in extra:
        mfn = dom.p2m.pop(gfn)
        assert mfn is not None
        frames.unpopulate(mfn)
        dom.pages -= 1
    for gfn in missing:
        mfn = frames.allocate(dom.domid)
        if mfn is None:
            raise HypercallError(-ENOMEM, "frames ran out while the domain was received")
        dom.p2m[gfn] = mfn
        dom.pages += 1
    for index in image.meta["p2m_leaves"]:
        dom.p2m.add_leaf(index)
    for ref, page in image.pages:
        if not ref & HELD:
            mfn = dom.p2m.get(ref)
            assert mfn is not None  # the decoder checked DATA names its GFNs
            if page == ZERO_PAGE:
                frames.data.pop(mfn, None)
            else:
                frames.write(mfn, 0, page)
    yield PREEMPT
    if host.domains.get(dom.domid) is not dom:
        raise HypercallError(-ESRCH, "the domain being received was destroyed")
    if len(dom.p2m) != saved["pages"]:
        raise refuse("the domain's pages do not add up to the last section's")
    dom.max_pages = saved["max_pages"]
    restoring.check_devices(host, image)  # others may have changed meanwhile; nothing can fail after this
    dom.busy_ops -= 1  # as a restore's last step, which assigns its devices
    restoring.finish(host, dom, image)
    dom.name = saved["name"]
    dom.token = token
    host.resuming.add(dom.domid)
    vits.resume_received(host)  # at once if it has no MSI device


def drop_incoming(host: Host, migrations: Migrations, ident: int) -> None:
    """The toolstack gives up receiving: what was received goes."""
    _incoming(host, migrations, ident)
    _drop(host, migrations, ident)
