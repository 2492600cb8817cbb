"""Python client for xenemu's two sockets: async (trio) for programs, blocking for scripts.

Both transports share one API definition: each method names a request and how to read its
reply, and the transport decides whether that is awaited or returned at once.

    async with await HypercallClient.connect(path, token) as xc:
        ops = await xc.iommu_op([ops.query_caps()])

    with SyncHypercallClient.connect(path, token) as xc:
        ops = xc.iommu_op([ops.query_caps()])
"""

from __future__ import annotations

import itertools
import socket
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import trio

from xenemu.abi.errno import errno_name
from xenemu.abi.grant_table import MapGrant, UnmapGrant, pack_map, pack_unmap, unpack_map, unpack_unmap
from xenemu.abi.ioreq import BufferedRequest, SyncRequest, read_ring, read_sync
from xenemu.abi.pv_iommu import Op, pack, unpack
from xenemu.wire import PROTOCOL_VERSION, FrameDecoder, Message, WireError, encode

#: Bytes per image_read / image_write (the daemon's bound; a frame holds 4 MiB).
IMAGE_CHUNK = 1 << 20


class XenError(Exception):
    """A request the daemon refused: ``errno`` is positive, as in ``errno``."""

    def __init__(self, ret: int, message: str = "", op: str = "") -> None:
        self.errno = -ret
        self.ret = ret
        self.op = op
        super().__init__(f"{op or 'request'} failed: {errno_name(ret)}" + (f" ({message})" if message else ""))


class ConnectionLost(Exception):
    """The daemon closed the connection."""


Post = Callable[[Message], Any]


def _checked(op: str) -> Post:
    def post(reply: Message) -> Message:
        ret = reply.get("ret", 0)
        if not isinstance(ret, int) or ret < 0:
            raise XenError(ret if isinstance(ret, int) else -5, str(reply.get("message", "")), op)
        return reply

    return post


class _Api:
    """The requests; ``_request`` is the transport's (sync: a value, async: a coroutine)."""

    def _request(self, op: str, args: dict[str, Any], post: Post) -> Any:
        raise NotImplementedError


class HypercallApi(_Api):
    def iommu_op(self, batch: Sequence[Op]) -> Any:
        """``do_iommu_op``: the ops back with status and out fields; XenError on call errors."""
        check = _checked("iommu_op")
        return self._request(
            "iommu_op", {"buf": bytes(pack(batch)), "count": len(batch)}, lambda r: unpack(check(r)["buf"])
        )

    def iommu_op_raw(self, buf: bytes, count: int) -> Any:
        """The raw call: ``(ret, buf)`` whatever ``ret`` is."""
        return self._request("iommu_op", {"buf": bytes(buf), "count": count}, lambda r: (r["ret"], r.get("buf")))

    def echo(self, buf: bytes, count: int = 0) -> Any:
        return self._request("echo", {"buf": bytes(buf), "count": count}, lambda r: _checked("echo")(r)["buf"])

    def create_ioreq_server(self, target: int) -> Any:
        return self._request("create_ioreq_server", {"target": target}, lambda r: _checked("ioreq")(r)["ioserver"])

    def destroy_ioreq_server(self, ioserver: int) -> Any:
        return self._request("destroy_ioreq_server", {"ioserver": ioserver}, _checked("destroy_ioreq_server"))

    def guest_write(self, gfn: int, data: bytes, offset: int = 0) -> Any:
        return self._request("guest_write", {"gfn": gfn, "offset": offset, "data": data}, _checked("guest_write"))

    def guest_read(self, gfn: int, length: int, offset: int = 0) -> Any:
        post = _checked("guest_read")
        return self._request("guest_read", {"gfn": gfn, "offset": offset, "length": length}, lambda r: post(r)["data"])

    def device_dma(self, bdf: str, addr: int, data: bytes | None = None, length: int = 0) -> Any:
        """A DMA by one of this domain's devices: the reply map (``ok``, ``data``, ``reason``)."""
        args: dict[str, Any] = {"bdf": bdf, "addr": addr, "length": length}
        if data is not None:
            args["data"] = data
        return self._request("device_dma", args, _checked("device_dma"))

    def domain_info(self) -> Any:
        return self._request("domain_info", {}, _checked("domain_info"))

    def decrease_reservation(self, gfns: Sequence[int]) -> Any:
        """Balloon out: the reply map (``ret`` GFNs done, ``status`` why it stopped)."""
        return self._request("decrease_reservation", {"gfns": list(gfns)}, _checked("decrease_reservation"))

    def populate_physmap(self, gfns: Sequence[int]) -> Any:
        return self._request("populate_physmap", {"gfns": list(gfns)}, _checked("populate_physmap"))

    def ioreq_fetch(self, ioserver: int) -> Any:
        """``(buffered requests, read pointer to acknowledge, synchronous requests)``."""
        check = _checked("ioreq_fetch")

        def post(reply: Message) -> tuple[list[BufferedRequest], int, list[SyncRequest]]:
            check(reply)
            buffered, read_pointer = read_ring(reply["page"])
            return buffered, read_pointer, [read_sync(req_id, raw) for req_id, raw in reply["sync"]]

        return self._request("ioreq_fetch", {"ioserver": ioserver}, post)

    def grant_access(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> Any:
        args = {"ref": ref, "domid": domid, "gfn": gfn, "readonly": readonly}
        return self._request("grant_access", args, _checked("grant_access"))

    def end_access(self, ref: int) -> Any:
        return self._request("end_access", {"ref": ref}, _checked("end_access"))

    def map_grant_refs(self, batch: Sequence[MapGrant]) -> Any:
        """``GNTTABOP_map_grant_ref``: the ops back with status, handle and dev_bus_addr."""
        check = _checked("map_grant_ref")
        args = {"cmd": "map_grant_ref", "buf": pack_map(batch), "count": len(batch)}
        return self._request("grant_table_op", args, lambda r: unpack_map(check(r)["buf"]))

    def unmap_grant_refs(self, batch: Sequence[UnmapGrant]) -> Any:
        check = _checked("unmap_grant_ref")
        args = {"cmd": "unmap_grant_ref", "buf": pack_unmap(batch), "count": len(batch)}
        return self._request("grant_table_op", args, lambda r: unpack_unmap(check(r)["buf"]))

    def its_mmio(self, frame: str, index: int, offset: int, size: int, value: int | None = None) -> Any:
        """A trapped vITS ("its", pITS index) or redistributor ("redist", vCPU) access; a read's value."""
        args: dict[str, Any] = {"frame": frame, "index": index, "offset": offset, "size": size}
        if value is not None:
            args["value"] = value
        check = _checked("its_mmio")
        return self._request("its_mmio", args, lambda r: check(r).get("value"))

    def its_end(self, vcpu: int, intid: int) -> Any:
        return self._request("its_end", {"vcpu": vcpu, "intid": intid}, _checked("its_end"))

    def ioreq_ack(self, ioserver: int, read_pointer: int) -> Any:
        args = {"ioserver": ioserver, "read_pointer": read_pointer}
        return self._request("ioreq_ack", args, _checked("ioreq_ack"))

    def ioreq_complete(self, ioserver: int, req_id: int) -> Any:
        return self._request("ioreq_complete", {"ioserver": ioserver, "id": req_id}, _checked("ioreq_complete"))


class ControlApi(_Api):
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
    ) -> Any:
        """``xl create``: the reply map with ``domid`` and ``token``; ``max_pages`` is xl's
        ``maxmem`` in frames (default: ``memory``)."""
        args: dict[str, Any] = {"type": type, "memory": memory, "domain_name": name, "vcpus": vcpus}
        if pin is not None:
            args["pin"] = list(pin)
        if target is not None:
            args["target"] = target
        if max_mappings is not None:
            args["max_mappings"] = max_mappings
        if max_pages is not None:
            args["max_pages"] = max_pages
        return self._request("create_domain", args, _checked("create_domain"))

    def set_max_pages(self, domid: int, max_pages: int) -> Any:
        """``xl mem-set``: the most the domain may populate, in frames."""
        return self._request("set_max_pages", {"domid": domid, "max_pages": max_pages}, _checked("set_max_pages"))

    def destroy_domain(self, domid: int) -> Any:
        return self._request("destroy_domain", {"domid": domid}, _checked("destroy_domain"))

    def list_domains(self) -> Any:
        return self._request("list_domains", {}, lambda r: _checked("list_domains")(r)["domains"])

    def assign_device(
        self,
        domid: int,
        bdf: str,
        rmrr: Sequence[tuple[int, int]] = (),
        its_devid: int | None = None,
        its_events: int = 0,
        pits: int = 0,
    ) -> Any:
        args: dict[str, Any] = {"domid": domid, "bdf": bdf, "rmrr": [list(r) for r in rmrr]}
        if its_devid is not None:
            args.update(its_devid=its_devid, its_events=its_events, pits=pits)
        return self._request("assign_device", args, _checked("assign_device"))

    def domain_token(self, domid: int) -> Any:
        return self._request("domain_token", {"domid": domid}, lambda r: _checked("domain_token")(r)["token"])

    def inject_fault(self, domid: int, bfn: int, clear: bool = False) -> Any:
        return self._request("inject_fault", {"domid": domid, "bfn": bfn, "clear": clear}, _checked("inject_fault"))

    def stats(self) -> Any:
        return self._request("stats", {}, _checked("stats"))

    def audit(self) -> Any:
        return self._request("audit", {}, lambda r: _checked("audit")(r)["violations"])

    def connections(self) -> Any:
        """The daemon's own accounting of its connections (``connections``, ``awaiting_hello``, ``evicted``)."""
        return self._request("connections", {}, _checked("connections"))

    def dump_mappings(self, domid: int, start: int = 0, limit: int = 4096) -> Any:
        args = {"domid": domid, "start": start, "limit": limit}
        return self._request("dump_mappings", args, lambda r: _checked("dump_mappings")(r)["mappings"])

    def frame_info(self, mfn: int | None = None, domid: int | None = None, gfn: int | None = None) -> Any:
        args = {k: v for k, v in (("mfn", mfn), ("domid", domid), ("gfn", gfn)) if v is not None}
        return self._request("frame_info", args, _checked("frame_info"))

    def its_info(self, domid: int) -> Any:
        return self._request("its_info", {"domid": domid}, _checked("its_info"))

    def its_stats(self) -> Any:
        return self._request("its_stats", {}, _checked("its_stats"))

    def host_info(self) -> Any:
        return self._request("host_info", {}, _checked("host_info"))

    # -- save and restore (``xl save`` / ``xl restore``): images cross in chunks of <= 1 MiB --
    def save_domain(self, domid: int, keep: bool = False) -> Any:
        """The reply with ``image``, ``size``, ``sha256``; the domain goes unless ``keep``."""
        return self._request("save_domain", {"domid": domid, "keep": keep}, _checked("save_domain"))

    def image_read(self, image: int, offset: int, length: int) -> Any:
        args = {"image": image, "offset": offset, "length": length}
        return self._request("image_read", args, lambda r: _checked("image_read")(r)["data"])

    def image_close(self, image: int) -> Any:
        return self._request("image_close", {"image": image}, _checked("image_close"))

    def restore_begin(self, size: int) -> Any:
        return self._request("restore_begin", {"size": size}, lambda r: _checked("restore_begin")(r)["image"])

    def image_write(self, image: int, offset: int, data: bytes) -> Any:
        args = {"image": image, "offset": offset, "data": data}
        return self._request("image_write", args, _checked("image_write"))

    def restore_domain(self, image: int) -> Any:
        """The reply with the new ``domid``, ``token`` and ``pages``."""
        return self._request("restore_domain", {"image": image}, _checked("restore_domain"))


def _decoded(decoder: FrameDecoder) -> Message | None:
    """The next whole message the decoder holds, or None until more bytes come."""
    message = decoder.next()
    if isinstance(message, WireError):
        raise ConnectionLost(message.message)
    return message


def _hello_args(token: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"version": PROTOCOL_VERSION}
    if token is not None:
        args["token"] = token
    return args


# -- async transport -------------------------------------------------------------------------------
class _AsyncTransport(_Api):
    """Several tasks may share one connection: whichever needs a message reads the next one
    and routes it (a reply to the request that waits for it, an event to ``events``)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self.events: deque[Message] = deque()
        self.domid: int | None = None
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._routed = trio.Event()
        self._outstanding: list[int] = []
        self._replies: dict[int, Message] = {}

    @classmethod
    async def _open(cls, path: str | Path, token: str | None) -> Self:
        stream = await trio.open_unix_socket(str(path))
        client = cls(stream)
        try:
            hello = await client.call("hello", _hello_args(token))
            client.domid = _checked("hello")(hello)["domid"]
        except BaseException:
            await stream.aclose()
            raise
        return client

    async def call(self, op: str, args: dict[str, Any]) -> Message:
        """Send one request and wait for its reply; pushed events are queued in ``events``."""
        req_id = next(self._ids)
        async with self._send_lock:
            self._outstanding.append(req_id)
            await self._stream.send_all(encode({"id": req_id, "op": op, "args": args}))
        try:
            await self._pump_until(lambda: req_id in self._replies)
        finally:
            if req_id in self._outstanding:
                self._outstanding.remove(req_id)
        return self._replies.pop(req_id)

    async def next_event(self) -> Message:
        """The next pushed event (queued ones first); waits for one if none is queued."""
        await self._pump_until(lambda: bool(self.events))
        return self.events.popleft()

    async def _pump_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self._read_lock.locked():
                await self._routed.wait()
                continue
            async with self._read_lock:
                try:
                    if ready():
                        return
                    self._route(await self._next_message())
                finally:  # wake the other waiters even if this reader was cancelled
                    routed, self._routed = self._routed, trio.Event()
                    routed.set()

    def _route(self, message: Message) -> None:
        if "event" in message and "id" not in message:
            self.events.append(message)
            return
        req_id = message.get("id")
        if req_id is None and self._outstanding:  # an error about a frame: the oldest request's
            req_id = self._outstanding[0]
        if req_id in self._outstanding:
            self._outstanding.remove(req_id)
            self._replies[req_id] = message

    async def _next_message(self) -> Message:
        while (message := _decoded(self._decoder)) is None:
            data = await self._stream.receive_some(1 << 16)
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._decoder.feed(data)
        return message

    async def _request(self, op: str, args: dict[str, Any], post: Post) -> Any:
        return post(await self.call(op, args))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class HypercallClient(_AsyncTransport, HypercallApi):
    """A guest's or emulator's connection: it speaks for the domain its token names."""

    @classmethod
    async def connect(cls, path: str | Path, token: str) -> HypercallClient:
        return await cls._open(path, token)


class ControlClient(_AsyncTransport, ControlApi):
    """The toolstack's connection (the control socket is the daemon owner's only)."""

    @classmethod
    async def connect(cls, path: str | Path) -> ControlClient:
        return await cls._open(path, None)


# -- blocking transport ----------------------------------------------------------------------------
class _SyncTransport(_Api):
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self.events: deque[Message] = deque()
        self.domid: int | None = None

    @classmethod
    def _open(cls, path: str | Path, token: str | None) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            client = cls(sock)
            client.domid = _checked("hello")(client.call("hello", _hello_args(token)))["domid"]
        except BaseException:
            sock.close()
            raise
        return client

    def call(self, op: str, args: dict[str, Any]) -> Message:
        req_id = next(self._ids)
        self._sock.sendall(encode({"id": req_id, "op": op, "args": args}))
        while True:
            message = self._next_message()
            if "event" in message and "id" not in message:
                self.events.append(message)
                continue
            if message.get("id") in (req_id, None):
                return message

    def _next_message(self) -> Message:
        while (message := _decoded(self._decoder)) is None:
            data = self._sock.recv(1 << 16)
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._decoder.feed(data)
        return message

    def _request(self, op: str, args: dict[str, Any], post: Post) -> Any:
        return post(self.call(op, args))

    def next_event(self, timeout: float | None = None) -> Message | None:
        """The next pushed event, or None if none came within ``timeout`` seconds."""
        if self.events:
            return self.events.popleft()
        self._sock.settimeout(timeout)
        try:
            while True:
                message = self._next_message()
                if "event" in message and "id" not in message:
                    return message
        except TimeoutError:
            return None
        finally:
            self._sock.settimeout(None)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncHypercallClient(_SyncTransport, HypercallApi):
    @classmethod
    def connect(cls, path: str | Path, token: str) -> SyncHypercallClient:
        return cls._open(path, token)


class SyncControlClient(_SyncTransport, ControlApi):
    @classmethod
    def connect(cls, path: str | Path) -> SyncControlClient:
        return cls._open(path, None)

    def save_image(self, domid: int, keep: bool = False, progress: Callable[[int], None] | None = None) -> bytes:
        """``xl save``'s whole image, read out in chunks (the domain goes unless ``keep``)."""
        reply = self.save_domain(domid, keep)
        image, size, parts = reply["image"], reply["size"], []
        try:
            for offset in range(0, size, IMAGE_CHUNK):
                parts.append(self.image_read(image, offset, min(IMAGE_CHUNK, size - offset)))
                if progress is not None:
                    progress(len(parts[-1]))
        finally:
            self.image_close(image)
        return b"".join(parts)

    def restore_image(self, data: bytes, progress: Callable[[int], None] | None = None) -> Any:
        """``xl restore``: a new domain from ``data``; the reply with ``domid``, ``token``, ``pages``."""
        image = self.restore_begin(len(data))
        for offset in range(0, len(data), IMAGE_CHUNK):
            self.image_write(image, offset, data[offset : offset + IMAGE_CHUNK])
            if progress is not None:
                progress(min(IMAGE_CHUNK, len(data) - offset))
        return self.restore_domain(image)
