"""One connection's session: reading its frames, sending its replies and events, its end.

A session knows its socket, which channel it came in on and, once it has said hello, which
domain it speaks for. It reads frames and hands each decoded message to whoever serves it
(the daemon's request handler); it never interprets a request itself. Its outbound side is
split in two so that a peer that stops reading only ever stalls itself: replies go out from
the request loop, events (IOREQ news, LPIs) from a task of the session's own, and one lock
keeps their frames whole.

Everything a peer can make it hold is bounded (PROTOCOL.md section 10): until hello the whole
session, its sends included, runs under the hello deadline and decodes with the handshake's
tight limits; after hello a frame begun must be finished within ``frame_timeout``; every frame
sent must be taken within ``send_timeout`` (else the peer is not reading and is cut); the
events waiting for a peer coalesce (one per IOREQ server, one per vCPU and LPI) and are at
most ``max_queued_events``, past which the peer is cut; and nothing a peer sent is echoed,
in a reply or a log line, beyond ``ECHO_LIMIT`` characters.

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
from xenemu.core.errors import EMSGSIZE, ETIMEDOUT, errno_name
from xenemu.core.memory.domain import Domain
from xenemu.server.limits import Limits, LogBudget
from xenemu.wire import HELLO_LIMITS, REQUEST_LIMITS, FrameDecoder, Message, WireError, encode_parts

log = structlog.get_logger("xenemu")
#: The lines every peer that has not said hello may cause, together (any local process may
#: open connections without a token, one after another).
ANONYMOUS_LOG = LogBudget(rate=20.0, burst=50)

READ_CHUNK = 1 << 16
#: Replies smaller than this go out in one write.
SMALL_FRAME = 1 << 16
#: The most characters of anything a peer sent that a reply or a log line repeats.
ECHO_LIMIT = 128
#: At shutdown, what a peer has left to take a frame still being sent.
SHUTDOWN_SEND_TIMEOUT = 1.0


def clip(value: Any) -> Any:
    """``value`` as a reply or a log line may repeat it: small scalars as they are, anything
    else as at most ``ECHO_LIMIT`` characters, at a cost that does not grow with its size."""
    if value is None or isinstance(value, bool | float) or (isinstance(value, int) and -(2**64) < value < 2**64):
        return value
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes | bytearray | memoryview):
        text = repr(bytes(value[:ECHO_LIMIT]))
    elif isinstance(value, list | tuple | dict | set | frozenset):
        return f"<{type(value).__name__} of {len(value)}>"
    else:
        text = f"<{type(value).__name__}>"
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}... ({len(value)} long)"


def error_reply(req_id: int | None, errno: int, message: str) -> Message:
    return {"id": req_id, "ret": errno, "error": errno_name(errno).lstrip("-"), "message": clip(message)}


class PeerNotReading(trio.BrokenResourceError):
    """The peer did not take a frame within the send timeout: the connection is cut."""


#: Answers one decoded request of a session (sending the reply is its business too).
RequestHandler = Callable[["Session", Message], Awaitable[None]]


@dataclass(eq=False)
class Session:
    """One connection: which socket, which domain it speaks for once it has said hello."""

    stream: trio.SocketStream
    channel: Channel
    peer: int
    limits: Limits = field(default_factory=Limits)
    domain: Domain | None = None
    closing: bool = False
    #: Cut by admission to make room for a newer connection that has not said hello either.
    evicted: bool = False
    read_scope: trio.CancelScope | None = None
    #: The scope of everything before hello (reads, handling, sends): its deadline is the hello's.
    hello_scope: trio.CancelScope | None = None
    hello_deadline: float = math.inf
    started: float = 0.0
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    #: The log lines this connection may cause once it speaks for a domain.
    log_budget: LogBudget = field(default_factory=LogBudget)
    #: No send ends later than this (set at shutdown).
    send_cutoff: float = math.inf
    _sends: set[trio.CancelScope] = field(default_factory=set)
    #: IOREQ servers whose emulator (this session's domain) has news; sent by a task of its own
    #: so that an emulator that stops reading never blocks whoever produced the news.
    pending_events: set[int] = field(default_factory=set)
    #: LPIs not sent yet, by (vCPU, INTID), in the order they first fired; one that fires
    #: again before it is sent is one event (as a GIC's pending bit is one bit).
    queued_lpis: dict[tuple[int, int], None] = field(default_factory=dict)
    events_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wake: trio.Event = field(default_factory=trio.Event)

    # -- outbound -------------------------------------------------------------------------------
    def post(self, ioserver: int) -> None:
        if ioserver not in self.pending_events and self._room_for_one_more():
            self.pending_events.add(ioserver)
            self.wake.set()

    def post_lpi(self, vcpu: int, intid: int) -> None:
        key = (vcpu, intid)
        if key not in self.queued_lpis and self._room_for_one_more():
            self.queued_lpis[key] = None
            self.wake.set()

    @property
    def queued(self) -> int:
        return len(self.pending_events) + len(self.queued_lpis)

    def _room_for_one_more(self) -> bool:
        """Whether one more distinct event may wait; if not, the peer is not reading and is cut."""
        if self.closing:
            return False
        if self.queued < self.limits.max_queued_events:
            return True
        self.log_closed(f"event queue full ({self.limits.max_queued_events} events not taken)")
        self.pending_events.clear()
        self.queued_lpis.clear()
        self.events_scope.cancel()
        self.close_soon()
        self.cut_sends(0)  # it is not reading: what it was being sent goes no further either
        return False

    async def send_events(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            for ioserver in sorted(self.pending_events):
                self.pending_events.discard(ioserver)
                await self.send({"event": "ioreq", "ioserver": ioserver})
            while self.queued_lpis:
                vcpu, intid = next(iter(self.queued_lpis))
                del self.queued_lpis[vcpu, intid]
                await self.send({"event": "lpi", "vcpu": vcpu, "intid": intid})

    async def send(self, message: Message) -> None:
        """Send one frame; a peer that does not take it within the send timeout is cut.  A
        reply too big for a frame is answered ``-EMSGSIZE`` instead (every reply is bounded by
        design; this keeps a slip from killing the connection's task)."""
        try:
            header, payload = encode_parts(message)
        except ValueError:
            log.error("reply too big for a frame", peer=self.peer, op=clip(message.get("op")))
            header, payload = encode_parts(error_reply(message.get("id"), -EMSGSIZE, "reply too big for a frame"))
        deadline = min(trio.current_time() + self.limits.send_timeout, self.send_cutoff)
        with trio.move_on_at(deadline) as scope:
            self._sends.add(scope)
            try:
                async with self.send_lock:
                    if len(payload) < SMALL_FRAME:
                        await self.stream.send_all(header + payload)
                    else:  # two writes rather than one more copy of a 2 MiB reply
                        await self.stream.send_all(header)
                        await self.stream.send_all(payload)
            finally:
                self._sends.discard(scope)
        if scope.cancelled_caught:
            self.log_closed(f"the peer did not take a {len(payload)}-byte frame in time")
            self.closing = True
            await trio.aclose_forcefully(self.stream)  # a frame may be half sent: the stream is done
            raise PeerNotReading

    async def refuse(
        self, req_id: int | None, errno: int, message: str, *, close: bool = False, op: Any = None
    ) -> None:
        """Log and answer a request with an error; ``close`` ends the session after it."""
        self.warn(
            "refused",
            channel=self.channel,
            domid=self.domain.domid if self.domain else None,
            op=clip(op),
            error=errno_name(errno),
            reason=clip(message),
        )
        if close:
            self.closing = True
        await self.send(error_reply(req_id, errno, message))

    def warn(self, event: str, **fields: Any) -> None:
        """A warning this peer caused, within its log budget (the control socket's are not
        counted: the toolstack is the daemon's owner)."""
        if self.channel == "control":
            log.warning(event, peer=self.peer, **fields)
            return
        dropped = (self.log_budget if self.domain is not None else ANONYMOUS_LOG).take()
        if dropped is not None:
            log.warning(event, peer=self.peer, **fields, **({"dropped_before": dropped} if dropped else {}))

    def log_closed(self, reason: str) -> None:
        self.warn("closed", channel=self.channel, domid=self.domain.domid if self.domain else None, reason=reason)

    def close_soon(self) -> None:
        self.closing = True
        if self.read_scope is not None:
            self.read_scope.cancel()

    def evict(self) -> None:
        """Cut a session that has not said hello, whatever it is doing."""
        self.evicted = self.closing = True
        if self.hello_scope is not None:
            self.hello_scope.cancel()

    def shutdown(self) -> None:
        """The daemon stops: no new request is read, and what is being sent has a second left."""
        self.close_soon()
        self.events_scope.cancel()
        self.cut_sends(SHUTDOWN_SEND_TIMEOUT)

    def cut_sends(self, within: float) -> None:
        """Whatever is being sent, or will be, must be taken ``within`` seconds from now."""
        self.send_cutoff = min(self.send_cutoff, trio.current_time() + within)
        for scope in self._sends:
            scope.deadline = min(scope.deadline, self.send_cutoff)

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
            pass  # the peer went away (or stopped reading), possibly while its reply was being sent
        except* Exception:
            log.exception("connection task failed", peer=self.peer)

    async def _send_events_until_broken(self) -> None:
        try:
            with self.events_scope:
                await self.send_events()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_soon()

    async def _read_requests(self, handle: RequestHandler, stopping: Callable[[], bool]) -> None:
        decoder = FrameDecoder(HELLO_LIMITS)
        if self.domain is None:
            with trio.move_on_at(self.hello_deadline) as scope:
                self.hello_scope = scope
                await self._serve_frames(decoder, handle, stopping, until_hello=True)
            if scope.cancelled_caught:
                if self.domain is None and not self.evicted:
                    with trio.CancelScope() as self.hello_scope:  # eviction still cuts the refusal
                        await self.refuse(None, -ETIMEDOUT, "no hello in time", close=True)
                return
            self.hello_scope = None
            if self.domain is None:
                return
        decoder.limits = REQUEST_LIMITS
        await self._serve_frames(decoder, handle, stopping, until_hello=False)

    async def _serve_frames(
        self, decoder: FrameDecoder, handle: RequestHandler, stopping: Callable[[], bool], *, until_hello: bool
    ) -> None:
        """Decode and handle frames until the session closes (or, ``until_hello``, has a domain)."""
        begun: float | None = None  # when the daemon first waited on the rest of a frame
        while not self.closing and not (until_hello and self.domain is not None):
            message = decoder.next()
            if message is None:
                deadline = math.inf
                if decoder.buffered and not until_hello:  # before hello, the hello deadline rules
                    begun = trio.current_time() if begun is None else begun
                    deadline = begun + self.limits.frame_timeout
                data = await self._receive(stopping, deadline)
                if data is None:
                    await self.refuse(None, -ETIMEDOUT, "frame not finished in time", close=True)
                    return
                if not data:
                    if decoder.buffered:
                        self.warn("truncated frame", buffered=decoder.buffered)
                    return
                decoder.feed(data)
                continue
            begun = None
            if isinstance(message, WireError):
                self.warn("malformed frame", error=clip(message.message))
                await self.send(error_reply(None, -message.errno, message.message))
                if message.fatal:
                    return
                continue
            await handle(self, message)

    async def _receive(self, stopping: Callable[[], bool], deadline: float) -> bytes | None:
        """The next bytes from the peer; none if it left, the session closes or the daemon
        stops; None if ``deadline`` passed first."""
        if stopping():
            return b""
        with trio.CancelScope(deadline=deadline) as scope:
            self.read_scope = scope
            try:
                data: bytes = await self.stream.receive_some(READ_CHUNK)
            finally:
                self.read_scope = None
            return data
        if self.closing or stopping():
            return b""
        return None


class Unheard:
    """LPIs given to a domain while no program of it was connected (a restored or migrated domain
    before its guest reconnects, a guest between two connections), or still unsent when its
    connection closed: the vITS has them in service, so they would never come again. The
    domain's next connection gets them after its hello. At most one per (vCPU, INTID) and
    ``limit`` per domain, kept with the domain instance they were given to (an id given again
    later names another domain)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[int, tuple[Domain, dict[tuple[int, int], None]]] = {}

    def hold(self, dom: Domain, lpis: list[tuple[int, int]]) -> None:
        owner, waiting = self.held.get(dom.domid, (dom, {}))
        if owner is not dom:
            waiting = {}
        self.held[dom.domid] = (dom, waiting)
        for key in lpis:
            if len(waiting) < self.limit:
                waiting[key] = None

    def hand_over(self, session: Session) -> None:
        """A program of the domain connected: what was given to it meanwhile is its now."""
        if session.channel != "hypercall" or session.domain is None:
            return
        owner, waiting = self.held.pop(session.domain.domid, (None, {}))
        if owner is session.domain:
            for vcpu, intid in waiting:
                session.post_lpi(vcpu, intid)

    def left(self, session: Session, sessions: set[Session], domains: dict[int, Domain]) -> None:
        """A hypercall session closed with LPIs not yet sent: another open session of the domain
        gets them, or its next one."""
        dom = session.domain
        if session.channel != "hypercall" or dom is None or not session.queued_lpis:
            return
        lpis, session.queued_lpis = list(session.queued_lpis), {}
        others = [s for s in sessions if s.channel == "hypercall" and s.domain is dom and not s.closing]
        if others:
            for vcpu, intid in lpis:
                others[0].post_lpi(vcpu, intid)
        elif domains.get(dom.domid) is dom:
            self.hold(dom, lpis)

    def forget(self, domid: int) -> None:
        self.held.pop(domid, None)
