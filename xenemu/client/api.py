"""The requests of PROTOCOL.md, each written once and typed for both transports.

Each method builds a ``Request``: the op, its arguments, and how to read the reply. The
``request`` descriptor turns it into a method whose type depends on the transport it is reached
through: ``SyncHypercallClient().iommu_op(batch)`` returns ``list[Op]``, and
``HypercallClient().iommu_op(batch)`` an awaitable of it. So one definition serves scripts and
trio programs, and mypy checks callers of both.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from xenemu.abi.grant_table import MapGrant, UnmapGrant, pack_map, pack_unmap, unpack_map, unpack_unmap
from xenemu.abi.ioreq import BufferedRequest, SyncRequest, read_ring, read_sync
from xenemu.abi.pv_iommu import Op, pack, unpack
from xenemu.client.errors import Message, checked

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Request(Generic[T]):
    """One request: what to send, and how its reply becomes the method's result."""

    op: str
    args: dict[str, Any]
    read: Callable[[Message], T]


class Blocking:
    """A transport that performs a request and returns its result."""

    def perform(self, request: Request[T]) -> T:
        raise NotImplementedError


class Awaiting:
    """A transport whose requests are awaited (trio)."""

    async def perform(self, request: Request[T]) -> T:
        raise NotImplementedError


class request(Generic[P, T]):  # lower case: used as a decorator, like property
    """Make a ``Request`` builder a client method, typed by the transport it is reached through."""

    def __init__(self, build: Callable[Concatenate[Any, P], Request[T]]) -> None:
        self._build = build
        functools.update_wrapper(self, build)  # name, docstring, module, __wrapped__ for help()

    def __call__(self, client: Any, *args: Any, **kwargs: Any) -> Any:
        """Called on the class, with the client first (as an unbound method is)."""
        return client.perform(self._build(client, *args, **kwargs))

    @overload
    def __get__(self, obj: Blocking, owner: type | None = None) -> Callable[P, T]: ...

    @overload
    def __get__(self, obj: Awaiting, owner: type | None = None) -> Callable[P, Awaitable[T]]: ...

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> request[P, T]: ...

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        build = self._build

        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return obj.perform(build(obj, *args, **kwargs))

        return method


def _reply(op: str) -> Callable[[Message], Message]:
    """Read a reply map as it is (after the errno check)."""
    return lambda reply: checked(reply, op)


def _field(op: str, name: str) -> Callable[[Message], Any]:
    """Read one field of a reply (after the errno check)."""
    return lambda reply: checked(reply, op)[name]


def _done(op: str) -> Callable[[Message], None]:
    """A reply that carries nothing but success."""

    def read(reply: Message) -> None:
        checked(reply, op)

    return read


class HypercallApi:
    """What a guest or an emulator may ask on ``hypercall.sock`` (PROTOCOL.md section 7)."""

    @request
    def iommu_op(self, batch: Sequence[Op]) -> Request[list[Op]]:
        """``do_iommu_op``: the ops back with each one's status and out fields.

        Raises ``XenError`` only for the call as a whole (``EINVAL``, ``E2BIG``, ``ESRCH``)."""
        return Request(
            "iommu_op",
            {"buf": bytes(pack(batch)), "count": len(batch)},
            lambda r: unpack(checked(r, "iommu_op")["buf"]),
        )

    @request
    def iommu_op_raw(self, buf: bytes, count: int) -> Request[tuple[int, bytes | None]]:
        """The raw call, for tests of the ABI: ``(ret, buf)`` whatever ``ret`` is."""
        return Request("iommu_op", {"buf": bytes(buf), "count": count}, lambda r: (r["ret"], r.get("buf")))

    @request
    def echo(self, buf: bytes, count: int = 0) -> Request[bytes]:
        """The same bytes back: the transport's own cost, for benchmarks."""
        return Request("echo", {"buf": bytes(buf), "count": count}, _field("echo", "buf"))

    @request
    def create_ioreq_server(self, target: int) -> Request[int]:
        """``XEN_DMOP_create_ioreq_server`` for ``target``: the new server's id."""
        return Request("create_ioreq_server", {"target": target}, _field("create_ioreq_server", "ioserver"))

    @request
    def destroy_ioreq_server(self, ioserver: int) -> Request[None]:
        """Destroy one of this emulator's IOREQ servers, releasing its mappings."""
        return Request("destroy_ioreq_server", {"ioserver": ioserver}, _done("destroy_ioreq_server"))

    @request
    def guest_write(self, gfn: int, data: bytes, offset: int = 0) -> Request[None]:
        """The domain's CPU writes ``data`` at ``offset`` of its page ``gfn`` (within one page)."""
        return Request("guest_write", {"gfn": gfn, "offset": offset, "data": data}, _done("guest_write"))

    @request
    def guest_read(self, gfn: int, length: int, offset: int = 0) -> Request[bytes]:
        """The domain's CPU reads ``length`` bytes at ``offset`` of its page ``gfn``."""
        return Request("guest_read", {"gfn": gfn, "offset": offset, "length": length}, _field("guest_read", "data"))

    @request
    def device_dma(self, bdf: str, addr: int, data: bytes | None = None, length: int = 0) -> Request[Message]:
        """A DMA by one of this domain's devices: the reply map (``ok``, ``data``, ``fault_bfn``, ``reason``)."""
        args: dict[str, Any] = {"bdf": bdf, "addr": addr, "length": length}
        if data is not None:
            args["data"] = data
        return Request("device_dma", args, _reply("device_dma"))

    @request
    def domain_info(self) -> Request[Message]:
        """This domain as firmware would describe it: type, pages, devices, its vITS frames."""
        return Request("domain_info", {}, _reply("domain_info"))

    @request
    def decrease_reservation(self, gfns: Sequence[int]) -> Request[Message]:
        """Balloon out: the reply map (``ret`` GFNs done, ``status`` why it stopped, ``waited``)."""
        return Request("decrease_reservation", {"gfns": list(gfns)}, _reply("decrease_reservation"))

    @request
    def populate_physmap(self, gfns: Sequence[int]) -> Request[Message]:
        """Balloon in: the reply map (``ret``, ``status``; a PV guest's new frames in ``mfns``)."""
        return Request("populate_physmap", {"gfns": list(gfns)}, _reply("populate_physmap"))

    @request
    def ioreq_fetch(self, ioserver: int) -> Request[tuple[list[BufferedRequest], int, list[SyncRequest]]]:
        """``(buffered requests, read pointer to acknowledge, synchronous requests)``."""

        def read(reply: Message) -> tuple[list[BufferedRequest], int, list[SyncRequest]]:
            checked(reply, "ioreq_fetch")
            buffered, read_pointer = read_ring(reply["page"])
            return buffered, read_pointer, [read_sync(req_id, raw) for req_id, raw in reply["sync"]]

        return Request("ioreq_fetch", {"ioserver": ioserver}, read)

    @request
    def ioreq_ack(self, ioserver: int, read_pointer: int) -> Request[None]:
        """Consume the buffered ring up to ``read_pointer``."""
        return Request("ioreq_ack", {"ioserver": ioserver, "read_pointer": read_pointer}, _done("ioreq_ack"))

    @request
    def ioreq_complete(self, ioserver: int, req_id: int) -> Request[None]:
        """Answer one synchronous request (the balloon call waiting on it may go on)."""
        return Request("ioreq_complete", {"ioserver": ioserver, "id": req_id}, _done("ioreq_complete"))

    @request
    def grant_access(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> Request[None]:
        """``gnttab_grant_foreign_access``: entry ``ref`` lets ``domid`` map this domain's ``gfn``."""
        args = {"ref": ref, "domid": domid, "gfn": gfn, "readonly": readonly}
        return Request("grant_access", args, _done("grant_access"))

    @request
    def end_access(self, ref: int) -> Request[None]:
        """``gnttab_end_foreign_access``: revoke entry ``ref`` (``EBUSY`` while it is mapped)."""
        return Request("end_access", {"ref": ref}, _done("end_access"))

    @request
    def map_grant_refs(self, batch: Sequence[MapGrant]) -> Request[list[MapGrant]]:
        """``GNTTABOP_map_grant_ref``: the ops back with status, handle and dev_bus_addr."""
        args = {"cmd": "map_grant_ref", "buf": pack_map(batch), "count": len(batch)}
        return Request("grant_table_op", args, lambda r: unpack_map(checked(r, "map_grant_ref")["buf"]))

    @request
    def unmap_grant_refs(self, batch: Sequence[UnmapGrant]) -> Request[list[UnmapGrant]]:
        """``GNTTABOP_unmap_grant_ref``: the ops back with each one's status."""
        args = {"cmd": "unmap_grant_ref", "buf": pack_unmap(batch), "count": len(batch)}
        return Request("grant_table_op", args, lambda r: unpack_unmap(checked(r, "unmap_grant_ref")["buf"]))

    @request
    def its_mmio(self, frame: str, index: int, offset: int, size: int, value: int | None = None) -> Request[int | None]:
        """A trapped vITS (``"its"``, pITS index) or redistributor (``"redist"``, vCPU) access:
        a read's value, or None for a write."""
        args: dict[str, Any] = {"frame": frame, "index": index, "offset": offset, "size": size}
        if value is not None:
            args["value"] = value
        return Request("its_mmio", args, lambda r: checked(r, "its_mmio").get("value"))

    @request
    def its_read(self, frame: str, index: int, offset: int, size: int) -> Request[int]:
        """``its_mmio`` as a read: the register's value."""
        args: dict[str, Any] = {"frame": frame, "index": index, "offset": offset, "size": size}
        return Request("its_mmio", args, lambda r: int(checked(r, "its_mmio").get("value", 0)))

    @request
    def its_end(self, vcpu: int, intid: int) -> Request[None]:
        """The guest's end of interrupt for an LPI delivered to ``vcpu``."""
        return Request("its_end", {"vcpu": vcpu, "intid": intid}, _done("its_end"))


class ControlApi:
    """What the toolstack may ask on ``control.sock`` (PROTOCOL.md section 8), after ``xl``."""

    @request
    def create_domain(
        self,
        type: str,
        memory: int,
        target: int | None = None,
        name: str = "",
        max_mappings: int | None = None,
        vcpus: int = 1,
        pin: Sequence[int] | None = None,
        max_pages: int | None = None,
    ) -> Request[Message]:
        """``xl create``: the reply map with ``domid`` and ``token``; ``memory`` and ``max_pages``
        (xl's ``maxmem``, default ``memory``) are in frames."""
        args: dict[str, Any] = {"type": type, "memory": memory, "domain_name": name, "vcpus": vcpus}
        if pin is not None:
            args["pin"] = list(pin)
        if target is not None:
            args["target"] = target
        if max_mappings is not None:
            args["max_mappings"] = max_mappings
        if max_pages is not None:
            args["max_pages"] = max_pages
        return Request("create_domain", args, _reply("create_domain"))

    @request
    def set_max_pages(self, domid: int, max_pages: int) -> Request[Message]:
        """``xl mem-set``: the most the domain may populate, in frames."""
        return Request("set_max_pages", {"domid": domid, "max_pages": max_pages}, _reply("set_max_pages"))

    @request
    def destroy_domain(self, domid: int) -> Request[Message]:
        """``xl destroy``: returns at once (ITS teardown may go on in the background)."""
        return Request("destroy_domain", {"domid": domid}, _reply("destroy_domain"))

    @request
    def list_domains(self) -> Request[list[Message]]:
        """``xl list``: one map per domain."""
        return Request("list_domains", {}, _field("list_domains", "domains"))

    @request
    def assign_device(
        self,
        domid: int,
        bdf: str,
        rmrr: Sequence[tuple[int, int]] = (),
        its_devid: int | None = None,
        its_events: int = 0,
        pits: int = 0,
    ) -> Request[Message]:
        """``xl pci-attach``: RMRR regions as ``(bfn, pages)``; with ``its_devid`` the device is
        MSI-capable behind pITS ``pits`` (the reply's ``vdevid`` is its virtual DeviceID)."""
        args: dict[str, Any] = {"domid": domid, "bdf": bdf, "rmrr": [list(r) for r in rmrr]}
        if its_devid is not None:
            args.update(its_devid=its_devid, its_events=its_events, pits=pits)
        return Request("assign_device", args, _reply("assign_device"))

    @request
    def domain_token(self, domid: int) -> Request[str]:
        """The token a program presents on ``hypercall.sock`` to speak for ``domid``."""
        return Request("domain_token", {"domid": domid}, _field("domain_token", "token"))

    @request
    def inject_fault(self, domid: int, bfn: int, clear: bool = False) -> Request[Message]:
        """Make IOMMU writes at ``bfn`` of the domain's context fail (or stop failing)."""
        return Request("inject_fault", {"domid": domid, "bfn": bfn, "clear": clear}, _reply("inject_fault"))

    @request
    def stats(self) -> Request[Message]:
        """The host's counters (frames, M2B entries, flushes...)."""
        return Request("stats", {}, _reply("stats"))

    @request
    def audit(self) -> Request[list[str]]:
        """Every invariant recomputed from scratch: the violations, empty when all hold."""
        return Request("audit", {}, _field("audit", "violations"))

    @request
    def connections(self) -> Request[Message]:
        """The daemon's own accounting of its connections (``connections``, ``awaiting_hello``, ``evicted``)."""
        return Request("connections", {}, _reply("connections"))

    @request
    def dump_mappings(self, domid: int, start: int = 0, limit: int = 4096) -> Request[list[Any]]:
        """The domain's IOMMU mappings from BFN ``start``, at most ``limit`` of them."""
        args = {"domid": domid, "start": start, "limit": limit}
        return Request("dump_mappings", args, _field("dump_mappings", "mappings"))

    @request
    def frame_info(self, mfn: int | None = None, domid: int | None = None, gfn: int | None = None) -> Request[Message]:
        """One machine frame (by ``mfn``, or a domain's ``gfn``): owner, references, M2B, grants."""
        args = {k: v for k, v in (("mfn", mfn), ("domid", domid), ("gfn", gfn)) if v is not None}
        return Request("frame_info", args, _reply("frame_info"))

    @request
    def its_info(self, domid: int) -> Request[Message]:
        """The domain's vITSs: frames, devices, and per-vITS command counters."""
        return Request("its_info", {"domid": domid}, _reply("its_info"))

    @request
    def its_stats(self) -> Request[Message]:
        """Per physical ITS: passes, batches, commands by kind, errors; domains tearing down."""
        return Request("its_stats", {}, _reply("its_stats"))

    @request
    def host_info(self) -> Request[Message]:
        """``xl info``: the host's options and capacity."""
        return Request("host_info", {}, _reply("host_info"))

    @request
    def dmesg(self, lines: int = 1000) -> Request[Message]:
        """``xl dmesg``: the daemon's last ``lines`` log lines (``lines``, oldest first), and
        ``dropped``, how many older ones its ring no longer holds."""
        return Request("dmesg", {"lines": lines}, _reply("dmesg"))

    # -- save and restore (``xl save`` / ``xl restore``): images cross in chunks of <= 1 MiB --
    @request
    def save_domain(self, domid: int, keep: bool = False, with_dm: bool = False) -> Request[Message]:
        """The reply with ``image``, ``size``, ``digest``; the domain goes unless ``keep``.
        ``with_dm``: its device models too, each an image in ``dm_images``."""
        args: dict[str, Any] = {"domid": domid, "keep": keep}
        if with_dm:
            args["with_dm"] = True
        return Request("save_domain", args, _reply("save_domain"))

    @request
    def image_read(self, image: int, offset: int, length: int) -> Request[bytes]:
        """At most 1 MiB of a saved image, from ``offset``."""
        return Request("image_read", {"image": image, "offset": offset, "length": length}, _field("image_read", "data"))

    @request
    def image_close(self, image: int) -> Request[Message]:
        """Close a transfer (a saved image once read out)."""
        return Request("image_close", {"image": image}, _reply("image_close"))

    @request
    def restore_begin(self, size: int) -> Request[int]:
        """An incoming image of ``size`` bytes: its transfer id."""
        return Request("restore_begin", {"size": size}, _field("restore_begin", "image"))

    @request
    def image_write(self, image: int, offset: int, data: bytes) -> Request[Message]:
        """The next chunk (at most 1 MiB) of an incoming image, where the last one ended."""
        return Request("image_write", {"image": image, "offset": offset, "data": data}, _reply("image_write"))

    @request
    def restore_domain(self, image: int, dm_images: Sequence[int] | None = None) -> Request[Message]:
        """``xl restore`` of a written image: the reply with the new ``domid``, ``token``, ``pages``;
        with ``dm_images``, its device models too (``device_models``: each one's ``domid``,
        ``token``, ``pages`` and ``servers``, ``[old id, new id]`` pairs)."""
        args: dict[str, Any] = {"image": image}
        if dm_images is not None:
            args["dm_images"] = list(dm_images)
        return Request("restore_domain", args, _reply("restore_domain"))

    # -- live migration (``xl migrate``): sections cross as images do, source to receiver ------
    @request
    def migrate_begin(self, domid: int, with_dm: bool = False) -> Request[Message]:
        """Start migrating ``domid`` out (log-dirty on; ``with_dm``: its device models go with it):
        the reply's ``migration`` id and ``pages``."""
        return Request("migrate_begin", {"domid": domid, "with_dm": with_dm}, _reply("migrate_begin"))

    @request
    def migrate_send(self, migration: int, pages: int = 8192) -> Request[Message]:
        """The next pre-copy section: ``image``, ``size``, ``round``, ``pages``, ``left``, ``dirtied``, ``sent``."""
        return Request("migrate_send", {"migration": migration, "pages": pages}, _reply("migrate_send"))

    @request
    def migrate_suspend(self, migration: int) -> Request[Message]:
        """Stop the domain and take its last section (``image``, ``size``, ``round``, ``pages``, ``sent``)."""
        return Request("migrate_suspend", {"migration": migration}, _reply("migrate_suspend"))

    @request
    def migrate_finish(self, migration: int, done: bool) -> Request[Message]:
        """``done``: destroy the source's copy; otherwise abandon, and the domain runs on."""
        return Request("migrate_finish", {"migration": migration, "done": done}, _reply("migrate_finish"))

    @request
    def migrate_receive(self, image: int, incoming: int = 0, dm_images: list[int] | None = None) -> Request[Message]:
        """Apply a written section on the receiver: ``incoming``, ``domid`` (and, last, ``token``;
        with ``dm_images``, the written images of its device models, their ``device_models``)."""
        args: dict[str, Any] = {"image": image, "incoming": incoming}
        if dm_images is not None:
            args["dm_images"] = dm_images
        return Request("migrate_receive", args, _reply("migrate_receive"))

    @request
    def migrate_commit(self, migration: int) -> Request[Message]:
        """The receiver has the domain: the source's stopped copy will never run again."""
        return Request("migrate_commit", {"migration": migration}, _reply("migrate_commit"))

    @request
    def migrate_resume(self, incoming: int) -> Request[Message]:
        """After the source's commit: the received domain takes its ``token`` and runs."""
        return Request("migrate_resume", {"incoming": incoming}, _reply("migrate_resume"))

    @request
    def migrate_drop(self, incoming: int) -> Request[Message]:
        """Give up receiving: the half-received domain is destroyed."""
        return Request("migrate_drop", {"incoming": incoming}, _reply("migrate_drop"))
