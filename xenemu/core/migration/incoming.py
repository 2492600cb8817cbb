"""The receiver of a live migration: the domain built section by section.

The first section creates it (hidden: busy, suspended, named ``NAME--incoming``); each one
populates and writes its GFNs and frees those gone; the last makes its p2m the source's, writes
the last pages a slice at a time, then does what a restore's last step does. The domain takes
the source's token and runs. Any failure destroys what was received.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator
from typing import Any

from xenemu.core.errors import EBUSY, EEXIST, EINVAL, ENOENT, ENOMEM, EOPNOTSUPP, ESRCH, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.migration import dm, vits
from xenemu.core.migration import restore as restoring
from xenemu.core.migration.image import DEVICE_MODEL, FINAL, HEADER, HELD, MAGIC, Image, checksum_steps, decode, refuse
from xenemu.core.migration.save import ZERO_PAGE
from xenemu.core.migration.stream import (
    COPY_SLICE,
    MAX_MIGRATIONS,
    PRECOPY,
    Incoming,
    Migrations,
    Precopy,
    check_int,
    decode_precopy,
    prune,
)


def receive(
    host: Host,
    migrations: Migrations,
    raw: bytes | bytearray,
    ident: int,
    dm_raws: list[bytes | bytearray] | None = None,
) -> Generator[str, None, dict[str, Any]]:
    """Apply one section (``ident`` 0: the first, which creates the domain); with the last, the
    images of its device models (``--with-dm``), restored to serve it. A failure destroys what
    was received: the migration is over on this side (the source's domain runs on)."""
    flags = _flags(raw)
    yield from checksum_steps(raw, flags)
    prune(host, migrations)
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
    models: list[dict[str, Any]] = []
    try:
        dm_images = []
        for dm_raw in dm_raws or []:
            yield from checksum_steps(dm_raw, DEVICE_MODEL)
            dm_images.append(dm.decode(dm_raw, summed=True))
        states = _check_models(host, image, dm_images)
        yield from _complete(host, migrations, inc, image)
        tokens = (image.live or {}).get("dm_tokens", [])
        for dm_image, state, token in zip(dm_images, states, tokens, strict=True):
            ids: dict[int, int] = {}
            built = yield from dm.restore_dm(host, dm_image, inc.dom.domid, ids, state)
            host.suspended.add(built.domid)  # paused with its guest until ``resume``
            inc.models.append((built.domid, token))
            models.append({"domid": built.domid, "pages": built.pages, "servers": sorted(ids.items())})
    except BaseException:
        _drop(host, migrations, ident)
        raise
    inc.ready = True
    reply = {"ret": 0, "incoming": ident, "domid": inc.dom.domid, "pages": inc.dom.pages, "paused": True}
    return reply | ({"device_models": models} if dm_raws else {})


def resume(host: Host, migrations: Migrations, ident: int) -> dict[str, Any]:
    """The source has let go of the domain (``commit``): the received copy takes its token (and
    its device models theirs) and runs, once its vITS is back on this pITS. Until then it waited
    paused, so a toolstack that died between the last section and the commit never leaves two
    running copies: the source's runs on (it was never committed) and this one waits to be
    dropped."""
    inc = _incoming(host, migrations, ident)
    if not inc.ready:
        raise HypercallError(-EINVAL, f"incoming migration {ident} has not received its last section")
    for domid, token in [(inc.dom.domid, inc.token), *inc.models]:
        if domid not in host.domains:
            raise HypercallError(-ESRCH, f"d{domid} of incoming migration {ident} was destroyed")
        _check_token(host, migrations, token)
    for domid, token in [(inc.dom.domid, inc.token), *inc.models]:
        _take_token(host, migrations, token)
        host.domain(domid).token = token
    for domid, _ in inc.models:
        host.suspended.discard(domid)
    host.resuming.add(inc.dom.domid)  # runs once its vITS is back on this pITS (vits.resume_received)
    vits.resume_received(host)  # at once if it has no MSI device
    del migrations.incoming[ident]
    models = [{"domid": d, "token": t} for d, t in inc.models]
    reply = {"ret": 0, "domid": inc.dom.domid, "token": inc.token, "pages": inc.dom.pages}
    return reply | ({"device_models": models} if models else {})


def _check_models(host: Host, image: Image, dm_images: list[Image]) -> list[dm.DmState]:
    """Before the last section is applied: each device model names frames of this guest, there
    is room for them, and the section carries a token for each."""
    live = image.live or {}
    tokens = live.get("dm_tokens", [])
    if len(tokens) != len(dm_images) or len(dm_images) > dm.MAX_DEVICE_MODELS:
        raise refuse("the last section's device-model tokens do not match the device-model images")
    states = [dm.parse(d) for d in dm_images]
    need = image.meta["held"]
    for dm_image, state in zip(dm_images, states, strict=True):
        dm.check_guest(state, image)
        need += dm_image.meta["domain"]["pages"] + dm_image.meta["held"] + len(state.servers)
    if need > host.frames.nr_free:
        free = host.frames.nr_free
        raise HypercallError(-ENOMEM, f"host too small for the device models: {need} frames, {free} free")
    return states


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
    """What was received goes: the half-built domain (and its device models) destroyed."""
    inc = migrations.incoming.pop(ident, None)
    if inc is None:
        return
    for domid, _ in inc.models:
        if domid in host.domains:
            host.destroy_domain(domid)
    if host.domains.get(inc.dom.domid) is inc.dom:
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
    waiting = [i for i, inc in migrations.incoming.items() if not inc.ready]
    if len(migrations.incoming) >= MAX_MIGRATIONS and not waiting:
        raise HypercallError(-EBUSY, f"{MAX_MIGRATIONS} received domains wait to be resumed or dropped")
    while len(migrations.incoming) >= MAX_MIGRATIONS:  # a half-received one; never a complete copy
        _drop(host, migrations, waiting.pop(0))
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


def _complete(host: Host, migrations: Migrations, inc: Incoming, image: Image) -> Generator[str, None, None]:
    """The last section: the p2m made what the source's was, the dirty pages written, then
    everything else as ``restore`` puts it back; the domain takes its token and runs."""
    dom, frames, live = inc.dom, host.frames, image.live
    assert live is not None
    token = live.get("token")
    if not {"token", "round"} <= set(live) <= {"token", "round", "dm_tokens"}:
        raise refuse("live must be {token, round[, dm_tokens]}")
    if not isinstance(token, str) or len(token) != 32 or not isinstance(live.get("dm_tokens", []), list):
        raise refuse("live's token is not 32 characters, or dm_tokens not a list")
    check_int(live["round"], "round", 1, 1 << 32)
    for dm_token in live.get("dm_tokens", []):
        if not isinstance(dm_token, str) or len(dm_token) != 32:
            raise refuse("a device model's token is not 32 characters")
    saved = image.meta["domain"]
    if saved["max_mappings"] != dom.max_mappings or image.meta["its"]["vcpus"] != host.its.domains[dom.domid].vcpus:
        raise refuse("the last section does not describe the domain the first one created")
    _check_token(host, migrations, token)
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
    vits.check(image, host, dom.domid)  # its tables: the last pages over what the domain has
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
    for done, (ref, page) in enumerate(image.pages):
        if done and not done % COPY_SLICE:
            yield PREEMPT  # the domain is suspended: nothing else writes it meanwhile
            if host.domains.get(dom.domid) is not dom:
                raise HypercallError(-ESRCH, "the domain being received was destroyed")
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
    _check_token(host, migrations, token)  # again: another arrival may have taken it meanwhile
    restoring.check_devices(host, image)  # others may have changed meanwhile; nothing can fail after this
    dom.busy_ops -= 1  # as a restore's last step, which assigns its devices
    restoring.finish(host, dom, image)
    dom.name = saved["name"]
    inc.token = token  # taken at ``resume``, once the source has let go


def _leaving(host: Host, migrations: Migrations) -> list[Domain]:
    """The domains of this host's stopped outgoing migrations: they go at their finish."""
    found = []
    for out in migrations.outgoing.values():
        if out.suspended:
            found += [d for d in (host.domains.get(i) for i in (out.dom.domid, *out.dms)) if d is not None]
    return found


def _take_token(host: Host, migrations: Migrations, token: str) -> None:
    """A migration to this same daemon: the stopped source (or its device model) lets go of the
    token the copy takes, as it will go at its finish."""
    for held in _leaving(host, migrations):
        if held.token == token:
            held.token = secrets.token_hex(16)


def _check_token(host: Host, migrations: Migrations, token: str) -> None:
    """No other domain here may have the token, but the stopped source of a migration to this
    same daemon (``xl migrate`` to localhost), which is destroyed at its finish."""
    leaving = {id(d) for d in _leaving(host, migrations)}
    if any(other.token == token and id(other) not in leaving for other in host.domains.values()):
        raise HypercallError(-EEXIST, "a domain here already has that token")


def drop_incoming(host: Host, migrations: Migrations, ident: int) -> None:
    """The toolstack gives up receiving: what was received goes."""
    _incoming(host, migrations, ident)
    _drop(host, migrations, ident)
