"""Toolstack requests that save and restore domains (``xl save`` / ``xl restore``), and the
chunked transfer of their images over the control socket."""

from __future__ import annotations

import weakref
from collections.abc import Generator
from dataclasses import dataclass
from typing import Annotated, Any

from xenemu.core.actions.base import ControlAction, MaxLen, handles
from xenemu.core.host import Host
from xenemu.core.migration import dm, live
from xenemu.core.migration.image import DEVICE_MODEL, Image, checksum_steps, decode, encode_steps
from xenemu.core.migration.restore import restore
from xenemu.core.migration.save import snapshot
from xenemu.core.migration.store import ImageStore

_STORES: weakref.WeakKeyDictionary[Host, ImageStore] = weakref.WeakKeyDictionary()


def store(host: Host) -> ImageStore:
    """The host's open transfers (kept beside it, so the composition root stays as it is)."""
    found = _STORES.get(host)
    if found is None:
        found = _STORES[host] = ImageStore(host.frames.nr_frames)
    return found


@dataclass(frozen=True)
class SaveDomain(ControlAction):
    """``xl save``: the domain's image, then the domain is destroyed (``keep``: it runs on, as
    ``xl save -c``). The image is read out with ``image_read``. ``with_dm``: each device-model
    domain whose target it is is saved with it, into an image of its own (``dm_images``), and
    destroyed before it."""

    name = "save_domain"
    domid: int
    keep: bool = False
    with_dm: bool = False


def _transfer(host: Host, image: Image) -> Generator[str, None, dict[str, Any]]:
    data = yield from encode_steps(image)  # summed in slices, from the copy
    return {"image": store(host).put(data), "size": len(data), "digest": data[-32:].hex(), "pages": len(image.gfns)}


@handles(SaveDomain)
def _save_domain(host: Host, caller: int, action: SaveDomain) -> Generator[str, None, dict[str, Any]]:
    # The consistent point: one step, a copy of its pages (and of its device models').
    if action.with_dm:
        image, dm_images = dm.snapshot_with_dms(host, action.domid)
    else:
        image, dm_images = snapshot(host, action.domid), []
    if not action.keep:
        for domid, _ in dm_images:  # first: its servers and foreign entries go with it, unannounced
            yield from host.destroying(domid)
        yield from host.destroying(action.domid)
    reply: dict[str, Any] = {"ret": 0} | (yield from _transfer(host, image))
    if action.with_dm:
        reply["dm_images"] = []
        for domid, dm_image in dm_images:
            reply["dm_images"].append({"domid": domid} | (yield from _transfer(host, dm_image)))
    return reply


@dataclass(frozen=True)
class ImageRead(ControlAction):
    name = "image_read"
    image: int
    offset: int
    length: int


@handles(ImageRead)
def _image_read(host: Host, caller: int, action: ImageRead) -> dict[str, Any]:
    return {"ret": 0, "data": store(host).read(action.image, action.offset, action.length)}


@dataclass(frozen=True)
class ImageClose(ControlAction):
    name = "image_close"
    image: int


@handles(ImageClose)
def _image_close(host: Host, caller: int, action: ImageClose) -> dict[str, Any]:
    store(host).close(action.image)
    return {"ret": 0}


@dataclass(frozen=True)
class RestoreBegin(ControlAction):
    """An image of ``size`` bytes will follow in ``image_write`` chunks."""

    name = "restore_begin"
    size: int


@handles(RestoreBegin)
def _restore_begin(host: Host, caller: int, action: RestoreBegin) -> dict[str, Any]:
    return {"ret": 0, "image": store(host).begin(action.size)}


@dataclass(frozen=True)
class ImageWrite(ControlAction):
    name = "image_write"
    image: int
    offset: int
    data: bytes


@handles(ImageWrite)
def _image_write(host: Host, caller: int, action: ImageWrite) -> dict[str, Any]:
    return {"ret": 0, "received": store(host).write(action.image, action.offset, action.data)}


@dataclass(frozen=True)
class RestoreDomain(ControlAction):
    """``xl restore``: a new domain (new domid and token) from a written image, which is consumed.
    ``dm_images``: its device models' images (consumed too), each restored to serve it."""

    name = "restore_domain"
    image: int
    dm_images: Annotated[list[int], MaxLen(dm.MAX_DEVICE_MODELS)] | None = None


@handles(RestoreDomain)
def _restore_domain(host: Host, caller: int, action: RestoreDomain) -> Generator[str, None, dict[str, Any]]:
    transfers = store(host)
    raw = transfers.take(action.image)
    dm_raws = [transfers.take(i) for i in action.dm_images or []]
    yield from checksum_steps(raw)
    image = decode(raw, summed=True)
    if action.dm_images is None:
        dom = yield from restore(host, image)
        return {"ret": 0, "domid": dom.domid, "token": dom.token, "pages": dom.pages}
    dm_images = []
    for dm_raw in dm_raws:
        yield from checksum_steps(dm_raw, DEVICE_MODEL)
        dm_images.append(dm.decode(dm_raw, summed=True))
    dom, dms = yield from dm.restore_with_dms(host, image, dm_images)
    return {
        "ret": 0,
        "domid": dom.domid,
        "token": dom.token,
        "pages": dom.pages,
        "device_models": [
            {
                "domid": d.dom.domid,
                "token": d.dom.token,
                "pages": d.dom.pages,
                "servers": sorted([old, new] for old, new in d.servers.items()),
            }
            for d in dms
        ],
    }


# -- live migration (``xl migrate``) ------------------------------------------------------------
_MIGRATIONS: weakref.WeakKeyDictionary[Host, live.Migrations] = weakref.WeakKeyDictionary()


def migrations(host: Host) -> live.Migrations:
    """The host's migrations out and in (kept beside it, as its transfers are)."""
    found = _MIGRATIONS.get(host)
    if found is None:
        found = _MIGRATIONS[host] = live.Migrations()
    return found


@dataclass(frozen=True)
class MigrateBegin(ControlAction):
    """Start migrating a domain out: log-dirty on; ``migrate_send`` then gives its sections."""

    name = "migrate_begin"
    domid: int
    #: Its device-model domains go with it, stopped and copied whole at the stop.
    with_dm: bool = False


@handles(MigrateBegin)
def _migrate_begin(host: Host, caller: int, action: MigrateBegin) -> Generator[str, None, dict[str, Any]]:
    ident = yield from live.begin(host, migrations(host), action.domid, action.with_dm)
    return {"ret": 0, "migration": ident, "pages": host.domain(action.domid).pages}


@dataclass(frozen=True)
class MigrateSend(ControlAction):
    """The next pre-copy section (up to ``pages`` pages), to be read out with ``image_read``."""

    name = "migrate_send"
    migration: int
    pages: int = live.SECTION_PAGES


@handles(MigrateSend)
def _migrate_send(host: Host, caller: int, action: MigrateSend) -> Generator[str, None, dict[str, Any]]:
    raw, info = yield from live.send(host, migrations(host), action.migration, action.pages)
    return {"ret": 0, "image": store(host).put(raw), "size": len(raw), **info}


@dataclass(frozen=True)
class MigrateSuspend(ControlAction):
    """Stop the domain and take its last section (``-EBUSY`` and it runs on if it cannot be)."""

    name = "migrate_suspend"
    migration: int


@handles(MigrateSuspend)
def _migrate_suspend(host: Host, caller: int, action: MigrateSuspend) -> Generator[str, None, dict[str, Any]]:
    raw, dm_raws, info = yield from live.suspend(host, migrations(host), action.migration)
    transfers = store(host)
    reply = {"ret": 0, "image": transfers.put(raw), "size": len(raw), **info}
    if dm_raws:
        reply["dm_images"] = [{"domid": d, "image": transfers.put(r), "size": len(r)} for d, r in dm_raws]
    return reply


@dataclass(frozen=True)
class MigrateFinish(ControlAction):
    """``done``: the receiver has the domain, destroy it here; else abandon, and it runs on."""

    name = "migrate_finish"
    migration: int
    done: bool


@handles(MigrateFinish)
def _migrate_finish(host: Host, caller: int, action: MigrateFinish) -> Generator[str, None, dict[str, Any]]:
    yield from live.finish(host, migrations(host), action.migration, action.done)
    return {"ret": 0}


@dataclass(frozen=True)
class MigrateReceive(ControlAction):
    """Apply a written section (``incoming`` 0: the first, which creates the domain); the last
    one's reply has the domain's ``token``, and with ``dm_images`` (its device models' written
    images, ``--with-dm``) their ``device_models``. The images are consumed, whatever the outcome."""

    name = "migrate_receive"
    image: int
    incoming: int = 0
    dm_images: Annotated[list[int], MaxLen(dm.MAX_DEVICE_MODELS)] | None = None


@handles(MigrateReceive)
def _migrate_receive(host: Host, caller: int, action: MigrateReceive) -> Generator[str, None, dict[str, Any]]:
    transfers = store(host)
    raw = transfers.take(action.image)
    dm_raws = [transfers.take(i) for i in action.dm_images or []]
    result = yield from live.receive(host, migrations(host), raw, action.incoming, dm_raws or None)
    return result


@dataclass(frozen=True)
class MigrateCommit(ControlAction):
    """The receiver has the domain: the source's stopped copy will only be destroyed."""

    name = "migrate_commit"
    migration: int


@handles(MigrateCommit)
def _migrate_commit(host: Host, caller: int, action: MigrateCommit) -> dict[str, Any]:
    live.commit(host, migrations(host), action.migration)
    return {"ret": 0}


@dataclass(frozen=True)
class MigrateResume(ControlAction):
    """The received domain takes its token and runs (after the source's commit)."""

    name = "migrate_resume"
    incoming: int


@handles(MigrateResume)
def _migrate_resume(host: Host, caller: int, action: MigrateResume) -> dict[str, Any]:
    return live.resume(host, migrations(host), action.incoming)


@dataclass(frozen=True)
class MigrateDrop(ControlAction):
    """Give up receiving: the half-received domain is destroyed."""

    name = "migrate_drop"
    incoming: int


@handles(MigrateDrop)
def _migrate_drop(host: Host, caller: int, action: MigrateDrop) -> dict[str, Any]:
    live.drop_incoming(host, migrations(host), action.incoming)
    return {"ret": 0}
