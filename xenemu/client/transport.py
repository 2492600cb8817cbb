"""The two transports: trio streams for programs, blocking sockets for scripts.

Either one sends a request, reads frames until its reply comes, and queues the events pushed
meanwhile. Whatever the socket says when the daemon goes away (EOF, ``EPIPE``, ``ECONNRESET``,
trio's ``BrokenResourceError``) becomes ``ConnectionLost``.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import trio

from xenemu.client.api import Awaiting, Blocking, ControlApi, HypercallApi, Request
from xenemu.client.errors import ConnectionLost, Message, checked
from xenemu.wire import PROTOCOL_VERSION, FrameDecoder, WireError, encode

T = TypeVar("T")
#: Bytes per image_read / image_write (the daemon's bound; a frame holds 4 MiB).
IMAGE_CHUNK = 1 << 20


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


def _is_event(message: Message) -> bool:
    return "event" in message and "id" not in message


# -- async transport -------------------------------------------------------------------------------
class _AsyncTransport(Awaiting):
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
            client.domid = checked(await client.call("hello", _hello_args(token)), "hello")["domid"]
        except BaseException:
            await stream.aclose()
            raise
        return client

    async def call(self, op: str, args: dict[str, Any]) -> Message:
        """Send one request and wait for its reply map (any ``ret``); events are queued in ``events``."""
        req_id = next(self._ids)
        async with self._send_lock:
            self._outstanding.append(req_id)
            try:
                await self._stream.send_all(encode({"id": req_id, "op": op, "args": args}))
            except trio.BrokenResourceError as exc:
                raise ConnectionLost(f"the daemon closed the connection ({exc.__cause__ or exc})") from None
        try:
            await self._pump_until(lambda: req_id in self._replies)
        finally:
            if req_id in self._outstanding:
                self._outstanding.remove(req_id)
        return self._replies.pop(req_id)

    async def perform(self, request: Request[T]) -> T:
        """Send a typed request and read its result (``XenError`` if the daemon refused it)."""
        return request.read(await self.call(request.op, request.args))

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
        if _is_event(message):
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
            try:
                data = await self._stream.receive_some(1 << 16)
            except trio.BrokenResourceError as exc:
                raise ConnectionLost(f"the daemon closed the connection ({exc.__cause__ or exc})") from None
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._decoder.feed(data)
        return message

    async def aclose(self) -> None:
        """Close the connection (the daemon releases what it held for it, e.g. IOREQ servers)."""
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class HypercallClient(_AsyncTransport, HypercallApi):
    """A guest's or emulator's connection: it speaks for the domain its token names."""

    @classmethod
    async def connect(cls, path: str | Path, token: str) -> HypercallClient:
        """Connect to ``hypercall.sock`` and say hello with the domain's token."""
        return await cls._open(path, token)


class ControlClient(_AsyncTransport, ControlApi):
    """The toolstack's connection (the control socket is the daemon owner's only)."""

    @classmethod
    async def connect(cls, path: str | Path) -> ControlClient:
        """Connect to ``control.sock`` and say hello (it speaks for dom0)."""
        return await cls._open(path, None)


# -- blocking transport ----------------------------------------------------------------------------
class _SyncTransport(Blocking):
    """One request at a time; events read while waiting for a reply are queued in ``events``."""

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
            client.domid = checked(client.call("hello", _hello_args(token)), "hello")["domid"]
        except BaseException:
            sock.close()
            raise
        return client

    def call(self, op: str, args: dict[str, Any]) -> Message:
        """Send one request and wait for its reply map (any ``ret``)."""
        req_id = next(self._ids)
        try:
            self._sock.sendall(encode({"id": req_id, "op": op, "args": args}))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost(f"the daemon closed the connection ({exc.strerror})") from None
        while True:
            message = self._next_message()
            if _is_event(message):
                self.events.append(message)
                continue
            if message.get("id") in (req_id, None):
                return message

    def perform(self, request: Request[T]) -> T:
        """Send a typed request and read its result (``XenError`` if the daemon refused it)."""
        return request.read(self.call(request.op, request.args))

    def _next_message(self) -> Message:
        while (message := _decoded(self._decoder)) is None:
            try:
                data = self._sock.recv(1 << 16)
            except ConnectionResetError as exc:
                raise ConnectionLost(f"the daemon closed the connection ({exc.strerror})") from None
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._decoder.feed(data)
        return message

    def next_event(self, timeout: float | None = None) -> Message | None:
        """The next pushed event, or None if none came within ``timeout`` seconds."""
        if self.events:
            return self.events.popleft()
        previous = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while True:
                message = self._next_message()
                if _is_event(message):
                    return message
        except TimeoutError:
            return None
        finally:
            self._sock.settimeout(previous)

    def set_timeout(self, seconds: float | None) -> None:
        """How long any reply may take (``TimeoutError`` after); None waits for ever."""
        self._sock.settimeout(seconds)

    def close(self) -> None:
        """Close the connection (the daemon releases what it held for it, e.g. IOREQ servers)."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncHypercallClient(_SyncTransport, HypercallApi):
    """The blocking twin of ``HypercallClient``."""

    @classmethod
    def connect(cls, path: str | Path, token: str) -> SyncHypercallClient:
        """Connect to ``hypercall.sock`` and say hello with the domain's token."""
        return cls._open(path, token)


class SyncControlClient(_SyncTransport, ControlApi):
    """The blocking twin of ``ControlClient``: what ``xenemu``'s toolstack verbs use."""

    @classmethod
    def connect(cls, path: str | Path) -> SyncControlClient:
        """Connect to ``control.sock`` and say hello (it speaks for dom0)."""
        return cls._open(path, None)

    def save_image(
        self,
        domid: int,
        keep: bool = False,
        progress: Callable[[int], None] | None = None,
        with_dm: bool = False,
    ) -> bytes:
        """``xl save``'s whole image, read out in chunks (the domain goes unless ``keep``); with
        ``with_dm`` its device models' images follow it, one after the other (the file format)."""
        reply = self.save_domain(domid, keep, with_dm)
        images = [(reply["image"], reply["size"])] + [(d["image"], d["size"]) for d in reply.get("dm_images", [])]
        parts = []
        try:
            for image, size in images:
                for offset in range(0, size, IMAGE_CHUNK):
                    parts.append(self.image_read(image, offset, min(IMAGE_CHUNK, size - offset)))
                    if progress is not None:
                        progress(len(parts[-1]))
        finally:
            for image, _ in images:
                self.image_close(image)
        return b"".join(parts)

    def restore_image(self, data: bytes, progress: Callable[[int], None] | None = None) -> Any:
        """``xl restore``: a new domain from ``data``; the reply with ``domid``, ``token``, ``pages``
        (and ``device_models`` when device models' images follow the guest's in ``data``)."""
        pieces = split_images(data)
        images = []
        for piece in pieces:
            image = self.restore_begin(len(piece))
            for offset in range(0, len(piece), IMAGE_CHUNK):
                self.image_write(image, offset, piece[offset : offset + IMAGE_CHUNK])
                if progress is not None:
                    progress(min(IMAGE_CHUNK, len(piece) - offset))
            images.append(image)
        return self.restore_domain(images[0], images[1:] if len(images) > 1 else None)


#: An image's header and trailer (PROTOCOL.md section 14): magic, version, flags, body length, 0.
_HEADER = struct.Struct("<8sIIQQ")
_DEVICE_MODEL = 4  # image.DEVICE_MODEL


def split_images(data: bytes) -> list[bytes]:
    """A save file as its images: the guest's, then each device model's (a header with the
    device-model flag where the one before ends). Anything else stays with the image before it,
    for the daemon to refuse (a file with trailing bytes is one image with trailing bytes)."""
    pieces, start, at = [], 0, 0
    while at + _HEADER.size <= len(data):
        magic, _, flags, body, _ = _HEADER.unpack_from(data, at)
        if magic != b"XNMUSAVE" or (at and not flags & _DEVICE_MODEL):
            break
        if at:
            pieces.append(data[start:at])
            start = at
        at += _HEADER.size + body + 32
    pieces.append(data[start:])
    return pieces
