"""One connection's session: reading its frames, sending its replies and events, its end.

A session knows its socket, which channel it came in on and, once it has said hello, which
domain it speaks for. It reads frames and hands each decoded message to whoever serves it
(the daemon's request handler); it never interprets a request itself. Its outbound side is
split in two so that a peer that stops reading only ever stalls itself: replies go out from
the request loop, events (IOREQ news, LPIs) from a task of the session's own, and one lock
keeps their frames whole.

This is the bottom room: it knows the wire, the errno names and the core's ``Channel`` and
``Domain`` types, and nothing of admission, scheduling or the host.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from xenemu.core.actions.dispatch import Channel
from xenemu.core.errors import ETIMEDOUT, errno_name
from xenemu.core.memory.domain import Domain
from xenemu.wire import FrameDecoder, Message, WireError, encode_parts

log = structlog.get_logger("xenemu")

READ_CHUNK = 1 << 16
#: Replies smaller than this go out in one write.
SMALL_FRAME = 1 << 16


def error_reply(req_id: int | None, errno: int, message: str) -> Message:
    return {"id": req_id, "ret": errno, "error": errno_name(errno).lstrip("-"), "message": message}


#: Answers one decoded request of a session (sending the reply is its business too).
RequestHandler = Callable[["Session", Message], Awaitable[None]]


@dataclass(eq=False)
class Session:
    """One connection: which socket, which domain it speaks for once it has said hello."""

    stream: trio.SocketStream
    channel: Channel
    peer: int
    domain: Domain | None = None
    closing: bool = False
    read_scope: trio.CancelScope | None = None
    hello_deadline: float = math.inf
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    #: IOREQ servers whose emulator (this session's domain) has news; sent by a task of its own
    #: so that an emulator that stops reading never blocks whoever produced the news.
    pending_events: set[int] = field(default_factory=set)
    #: Other events in the order they happened (LPIs).
    queued_events: list[Message] = field(default_factory=list)
    wake: trio.Event = field(default_factory=trio.Event)

    # -- outbound -------------------------------------------------------------------------------
    def post(self, ioserver: int) -> None:
        self.pending_events.add(ioserver)
        self.wake.set()

    def post_message(self, message: Message) -> None:
        self.queued_events.append(message)
        self.wake.set()

    async def send_events(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            for ioserver in sorted(self.pending_events):
                self.pending_events.discard(ioserver)
                await self.send({"event": "ioreq", "ioserver": ioserver})
            queued, self.queued_events = self.queued_events, []
            for message in queued:
                await self.send(message)

    async def send(self, message: Message) -> None:
        header, payload = encode_parts(message)
        async with self.send_lock:
            if len(payload) < SMALL_FRAME:
                await self.stream.send_all(header + payload)
            else:  # two writes rather than one more copy of a 2 MiB reply
                await self.stream.send_all(header)
                await self.stream.send_all(payload)

    async def refuse(
        self, req_id: int | None, errno: int, message: str, *, close: bool = False, op: Any = None
    ) -> None:
        """Log and answer a request with an error; ``close`` ends the session after it."""
        log.warning(
            "refused",
            peer=self.peer,
            channel=self.channel,
            domid=self.domain.domid if self.domain else None,
            op=op,
            error=errno_name(errno),
            reason=message,
        )
        await self.send(error_reply(req_id, errno, message))
        if close:
            self.closing = True

    def close_soon(self) -> None:
        self.closing = True
        if self.read_scope is not None:
            self.read_scope.cancel()

    # -- the connection's life ------------------------------------------------------------------
    async def serve(self, handle: RequestHandler, stopping: Callable[[], bool]) -> None:
        """Read and answer requests until the peer leaves, the session closes or the daemon stops
        (``stopping``); events go out meanwhile. A peer that went away is no error."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_events_until_broken)
                await self._read_requests(handle, stopping)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away, possibly while its reply was being sent
        except* Exception:
            log.exception("connection task failed", peer=self.peer)

    async def _send_events_until_broken(self) -> None:
        try:
            await self.send_events()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_soon()

    async def _read_requests(self, handle: RequestHandler, stopping: Callable[[], bool]) -> None:
        decoder = FrameDecoder()
        while not self.closing:
            message = decoder.next()
            if message is None:
                data = await self._receive(stopping)
                if not data:
                    if decoder.buffered:
                        log.warning("truncated frame", peer=self.peer, buffered=decoder.buffered)
                    return
                decoder.feed(data)
                continue
            if isinstance(message, WireError):
                log.warning("malformed frame", peer=self.peer, error=message.message)
                await self.send(error_reply(None, -message.errno, message.message))
                if message.fatal:
                    return
                continue
            await handle(self, message)

    async def _receive(self, stopping: Callable[[], bool]) -> bytes:
        """The next bytes from the peer, or none: it left, the session closes, the daemon stops,
        or a peer that has not said hello ran out of time (and is told so)."""
        if stopping():
            return b""
        if self.domain is None and trio.current_time() >= self.hello_deadline:
            await self.refuse(None, -ETIMEDOUT, "no hello in time", close=True)
            return b""
        deadline = self.hello_deadline if self.domain is None else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            self.read_scope = scope
            data: bytes = await self.stream.receive_some(READ_CHUNK)
            self.read_scope = None
            return data
        self.read_scope = None
        if self.domain is None and not self.closing and trio.current_time() >= self.hello_deadline:
            await self.refuse(None, -ETIMEDOUT, "no hello in time", close=True)
        return b""
