"""The source of a live migration: log-dirty on, pre-copy rounds in sections, the stop, the end.

Each round begins by reading and clearing both logs (``read_dirty``): the p2m's (CPU writes,
populates and depopulates) and the IOMMU entries' dirty bits (DMA writes, through the domain's
own context or an emulator's foreign mapping); a page written after its copy is in a log, so it
is sent again. The stop takes a save image of everything but the dirty pages in one step, then
copies those a slice at a time: stopped, nothing can write them meanwhile.
"""

from __future__ import annotations

from array import array
from collections.abc import Generator
from typing import Any

from xenemu.core.errors import EBUSY, EINVAL, ENOENT, EOPNOTSUPP, EPERM, ESRCH, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.migration import dm
from xenemu.core.migration.image import FINAL, REF, encode_steps
from xenemu.core.migration.save import ZERO_PAGE, snapshot
from xenemu.core.migration.stream import (
    COPY_SLICE,
    MAX_MIGRATIONS,
    SECTION_PAGES,
    Migrations,
    Outgoing,
    encode_precopy,
    log_off,
    log_on,
    prune,
)


def begin(host: Host, migrations: Migrations, domid: int, with_dm: bool = False) -> Generator[str, None, int]:
    """Start migrating ``domid`` out: log-dirty on, the first round is every populated page.
    What could never be migrated is refused now; what must first let go, at ``suspend``."""
    dom = host.domain(domid)
    if dom.is_hwdom:
        raise HypercallError(-EPERM, "the hardware domain cannot be migrated")
    if not dom.is_hvm:
        raise HypercallError(-EOPNOTSUPP, "a PV domain's GFNs are machine frames: only HVM domains migrate")
    if dom.target is not None:
        raise HypercallError(-EOPNOTSUPP, f"d{domid} is a device model: it migrates with its guest")
    prune(host, migrations)
    if with_dm and not dm.device_models(host, domid):
        raise HypercallError(-EINVAL, f"with_dm: no device-model domain has d{domid} as its target")
    if any(inc.dom is dom for inc in migrations.incoming.values()):
        raise HypercallError(-EBUSY, f"d{domid} is still being received")
    for ident, other in list(migrations.outgoing.items()):
        if other.dom is dom:  # a toolstack that died mid-way left it (stopped, perhaps): start afresh
            if other.committed:
                raise HypercallError(-EBUSY, f"d{domid} is committed to its receiver: finish it (it only goes)")
            abandon(host, migrations, ident)
    running = [i for i, o in migrations.outgoing.items() if not o.suspended]
    if len(migrations.outgoing) >= MAX_MIGRATIONS and not running:
        raise HypercallError(-EBUSY, f"{MAX_MIGRATIONS} migrations are stopped at their last section here")
    while len(migrations.outgoing) >= MAX_MIGRATIONS:  # one still in pre-copy; never a stopped one
        abandon(host, migrations, running.pop(0))
    log_on(host, dom)
    out = Outgoing(dom, array("Q"), with_dm=with_dm)
    ident = migrations._new_id()
    migrations.outgoing[ident] = out
    try:
        todo = array("Q")  # 8 bytes a GFN: a 16 GiB guest's round is 32 MiB of them
        for count, part in enumerate(dom.p2m.gfns_by_leaf()):
            todo.extend(part)
            if count % 32 == 31:
                yield PREEMPT
                if host.domains.get(domid) is not dom:
                    raise HypercallError(-ESRCH, f"d{domid} was destroyed")
    except BaseException:
        if migrations.outgoing.pop(ident, None) is not None:
            log_off(host, out)
        raise
    # GFNs populated during the pauses are in the log too: sent again next round, harmlessly.
    out.todo, out.dirtied = todo, len(todo)
    return ident


def _outgoing(host: Host, migrations: Migrations, ident: int) -> Outgoing:
    out = migrations.outgoing.get(ident)
    if out is not None and host.domains.get(out.dom.domid) is not out.dom:
        del migrations.outgoing[ident]
        log_off(host, out)
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
        out.todo, out.at = array("Q", sorted(read_dirty(host, dom))), 0
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
        if page is not None and page != ZERO_PAGE:  # a zero page is SENT without DATA
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
    raw = yield from encode_precopy(meta, sent, gone, data)
    info = {"round": out.round, "pages": len(sent), "left": meta["left"], "dirtied": out.dirtied, "sent": out.sent}
    return raw, info


def suspend(
    host: Host, migrations: Migrations, ident: int
) -> Generator[str, None, tuple[bytes, list[tuple[int, bytes]], dict[str, Any]]]:
    """Stop the domain and take its last section: a save image of everything, whose pages are
    those dirtied since the pre-copy sections. If it cannot be saved now (an operation in
    flight, a backend still mapping its grants, ...), it runs on and the error says why; the
    migration stays open (more pre-copy, then another try). With its device models, they are
    stopped too and each gives a device model's image (``dm.py``), whole: they are small."""
    out = _outgoing(host, migrations, ident)
    dom = out.dom
    if out.suspended:
        raise HypercallError(-EBUSY, f"migration {ident} is stopped already")
    dms = dm.device_models(host, dom.domid) if out.with_dm else []
    if out.with_dm and not dms:
        raise HypercallError(-EINVAL, f"with_dm: d{dom.domid} has no device-model domain any more")
    stopped = [dom.domid, *dms]
    host.suspended.update(stopped)
    try:
        image = snapshot(host, dom.domid, set())  # everything but the dirty pages: one step
        dm_images = [(d, dm.snapshot_dm(host, d, dom.domid)) for d in dms]
        dirty = read_dirty(host, dom) | set(out.todo[out.at :])  # after: the save may write its vITS tables
    except BaseException:
        host.suspended.difference_update(stopped)
        raise
    out.suspended, out.dms = True, dms
    final_round = out.round if out.at < len(out.todo) else out.round + 1  # a round begun ends here
    out.todo, out.at = array("Q"), 0
    # The dirty pages, a slice at a time: stopped, nothing can write them meanwhile (§14.1).
    pages: list[tuple[int, bytes | memoryview]] = []
    frames = host.frames
    for done, gfn in enumerate(sorted(dirty)):
        if done and not done % COPY_SLICE:
            yield PREEMPT
            if host.domains.get(dom.domid) is not dom:
                raise HypercallError(-ESRCH, f"d{dom.domid} was destroyed")
        mfn = dom.p2m.get(gfn)
        if mfn is not None:
            page = frames.data.get(mfn)
            pages.append((gfn, ZERO_PAGE if page is None else bytes(page)))
    sent = len(pages)
    image.pages = pages + image.pages  # the GFNs' pages, then the held frames' (refs ascending)
    out.sent += sent
    out.round = final_round
    tokens = [host.domain(d).token for d in dms]
    image.live = {"token": dom.token, "round": final_round} | ({"dm_tokens": tokens} if dms else {})
    raw = yield from encode_steps(image, FINAL)
    dm_raws = []
    for domid, dm_image in dm_images:
        dm_raws.append((domid, (yield from encode_steps(dm_image))))
    return raw, dm_raws, {"round": final_round, "pages": sent, "sent": out.sent, "dirtied": len(dirty)}


def finish(host: Host, migrations: Migrations, ident: int, done: bool) -> Generator[str, None, None]:
    """``done``: the receiver has the domain, so the source's copy is destroyed (emulators'
    foreign mappings of its frames get ``IOREQ_TYPE_INVALIDATE`` first, as on any destroy).
    Otherwise the migration is abandoned and the domain runs on here."""
    out = _outgoing(host, migrations, ident)
    if done and not out.suspended:
        raise HypercallError(-EINVAL, f"migration {ident} has not taken its last section")
    if not done and out.committed:
        raise HypercallError(-EINVAL, f"migration {ident} is committed: its domain runs on the receiver")
    del migrations.outgoing[ident]
    log_off(host, out)
    host.suspended.difference_update([out.dom.domid, *out.dms])
    if done:
        for domid in out.dms:  # first, as a save with them: their servers and mappings go unannounced
            if domid in host.domains:
                yield from host.destroying(domid)
        yield from host.destroying(out.dom.domid)


def commit(host: Host, migrations: Migrations, ident: int) -> None:
    """The receiver has the domain: from now on the source's stopped copy never runs again here
    (no abandon, no new migration resumes it); ``finish`` destroys it. The toolstack commits
    before it resumes the receiver's copy, so there is never a moment with two running copies."""
    out = _outgoing(host, migrations, ident)
    if not out.suspended:
        raise HypercallError(-EINVAL, f"migration {ident} has not taken its last section")
    out.committed = True


def abandon(host: Host, migrations: Migrations, ident: int) -> None:
    """End an outgoing migration without destroying anything: the domain runs on."""
    out = migrations.outgoing.pop(ident)
    log_off(host, out)
    host.suspended.difference_update([out.dom.domid, *out.dms])
