"""Accepting and admission: who may connect, and as which domain.

This room owns the door: the listening sockets and their files (created so that a client
that sees one can connect, with the permissions of its channel: the toolstack's control
socket for its owner only, the guests' hypercall socket for anyone, who must then prove a
domain with its token), the connection caps (all connections, and a domain's hypercall
connections), the hello deadline, and the hello handshake itself: protocol version, then
the domain the session speaks for (the hardware domain on the control channel, the token's
domain on the hypercall channel). It keeps the registry of live sessions, since the caps
are counted over it; the daemon reads the same registry to route events.

It builds on the session room and knows nothing of scheduling.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from xenemu import __version__
from xenemu.core.actions.dispatch import Channel
from xenemu.core.errors import EACCES, EMFILE, EPROTO, EPROTONOSUPPORT
from xenemu.core.host import Host
from xenemu.core.memory.domain import Domain
from xenemu.server.limits import Limits
from xenemu.server.session import Session, error_reply
from xenemu.wire import MAX_FRAME, PROTOCOL_VERSION

log = structlog.get_logger("xenemu")

#: Runs one accepted connection for as long as it lasts.
ConnectionHandler = Callable[[trio.SocketStream, Channel], Awaitable[None]]


async def listen(path: Path, mode: int) -> trio.SocketListener:
    """Bind and listen under a temporary name, then rename: a client that sees the socket
    file can always connect to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o777 ^ mode)
    try:
        await sock.bind(str(staging))
    finally:
        os.umask(old_umask)
    os.chmod(staging, mode)
    sock.listen(128)
    os.replace(staging, path)
    return trio.SocketListener(sock)


class Admission:
    """The live sessions, and the rules for joining them."""

    def __init__(self, host: Host, limits: Limits) -> None:
        self.host = host
        self.limits = limits
        self.sessions: set[Session] = set()
        self._next_peer = 1

    async def accept(
        self, listener: trio.SocketListener, channel: Channel, nursery: trio.Nursery, serve: ConnectionHandler
    ) -> None:
        """Accept connections on ``listener`` for ever, each run by ``serve`` in ``nursery``."""
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(serve, stream, channel)

    async def admit(self, stream: trio.SocketStream, channel: Channel) -> Session | None:
        """A session for a new connection, its hello clock running; or none, the connection
        refused and closed, when there are too many already."""
        session = Session(stream, channel, self._next_peer)
        self._next_peer += 1
        if len(self.sessions) >= self.limits.max_connections:
            log.warning("refused", peer=session.peer, channel=channel, error="-EMFILE", reason="too many connections")
            with trio.move_on_after(1):
                await session.send(error_reply(None, -EMFILE, "too many connections"))
            await stream.aclose()
            return None
        self.sessions.add(session)
        session.hello_deadline = trio.current_time() + self.limits.hello_timeout
        return session

    def leave(self, session: Session) -> None:
        """The session has ended: it no longer counts, nor receives events."""
        self.sessions.discard(session)

    async def hello(self, session: Session, req_id: int | None, op: Any, args: Any) -> None:
        """A session's first request: it must be hello, in our version, naming a domain that
        has room for one more connection; then the session speaks for that domain."""
        if op != "hello" or not isinstance(args, dict):
            await session.refuse(req_id, -EPROTO, "the first request must be hello", close=True)
            return
        version = args.get("version")
        if version != PROTOCOL_VERSION:
            await session.refuse(req_id, -EPROTONOSUPPORT, f"protocol version {version!r} unsupported", close=True)
            return
        if session.channel == "control":
            dom: Domain | None = self.host.hwdom
        else:
            dom = self.domain_for_token(args.get("token"))
            if dom is None:
                await session.refuse(req_id, -EACCES, "bad token", close=True, op="hello")
                return
        assert dom is not None
        if session.channel == "hypercall":
            peers = sum(1 for s in self.sessions if s.domain is dom and s.channel == "hypercall")
            if peers >= self.limits.max_connections_per_domain:
                await session.refuse(req_id, -EMFILE, f"d{dom.domid} has {peers} connections", close=True)
                return
        session.domain = dom
        log.debug("hello", peer=session.peer, channel=session.channel, domid=dom.domid)
        await session.send(
            {
                "id": req_id,
                "ret": 0,
                "version": PROTOCOL_VERSION,
                "domid": dom.domid,
                "max_frame": MAX_FRAME,
                "server": f"xenemu {__version__}",
            }
        )

    def domain_for_token(self, token: Any) -> Domain | None:
        """The domain whose token this is, compared in constant time against every domain."""
        if not isinstance(token, str):
            return None
        found = None
        for dom in self.host.domains.values():
            if hmac.compare_digest(dom.token.encode(), token.encode("utf-8", "replace")):
                found = dom
        return found
