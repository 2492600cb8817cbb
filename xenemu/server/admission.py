"""Accepting and admission: who may connect, and as which domain.

This room owns the door: the state directory (the daemon's own: created ``0700``, refused if
someone else owns it or may write to it, and locked for the daemon's life so a second daemon
cannot take it over), the listening sockets and their files (created so that a client that
sees one can connect, with the permissions of its channel: the toolstack's control socket for
its owner only, the guests' hypercall socket for anyone, who must then prove a domain with its
token), the connection caps, the hello deadline, and the hello handshake itself: protocol
version, then the domain the session speaks for (the hardware domain on the control channel,
the token's domain on the hypercall channel). It keeps the registry of live sessions, since
the caps are counted over it; the daemon reads the same registry to route events.

The caps keep one kind of peer from locking out another: the control socket's connections are
counted apart; hypercall connections that have not said hello have a small pool of their own,
where a new one evicts the oldest (so token-less peers can hold nothing an authenticated
guest needs); the hypercall connections that have said hello are capped in all and per domain.

It builds on the session room and knows nothing of scheduling.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import os
import socket
import stat
import tempfile
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
from xenemu.server.session import Session, clip, error_reply
from xenemu.wire import MAX_FRAME, PROTOCOL_VERSION, encode

log = structlog.get_logger("xenemu")

#: Runs one accepted connection for as long as it lasts.
ConnectionHandler = Callable[[trio.SocketStream, Channel], Awaitable[None]]
#: accept() errors that mean "out of descriptors or memory for now": wait, then accept again.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: The most a refusal sent at the door may take (the peer has not been admitted).
DOOR_SEND_TIMEOUT = 1.0
#: The file in the state directory a live daemon holds an exclusive lock on.
LOCK_NAME = "xenemu.lock"


class StateDirError(Exception):
    """The state directory is not the daemon's own, or another daemon holds it (one line)."""


class StateDir:
    """The daemon's state directory, checked and locked for as long as this object lives.

    Created ``0700`` if missing; an existing one must be a real directory (not a symlink),
    owned by the daemon's user and writable by nobody else, as ssh-agent and tmux require.
    A lock file in it is held under ``flock(LOCK_EX)``: a second daemon is refused."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            created = False
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise StateDirError(f"{path} is not a directory of this user's ({os.strerror(exc.errno or 0)})") from None
        try:
            if created:
                os.fchmod(self.fd, 0o700)  # whatever the umask was; by descriptor, never by path
            self._check(os.fstat(self.fd))
            self.lock_fd = self._lock()
        except BaseException:
            os.close(self.fd)
            raise

    def _check(self, st: os.stat_result) -> None:
        uid = os.geteuid()
        if st.st_uid != uid:
            raise StateDirError(f"{self.path} is owned by uid {st.st_uid}, not by this user (uid {uid}): refusing it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            mode = stat.S_IMODE(st.st_mode)
            raise StateDirError(f"{self.path} is writable by group or others (mode {mode:04o}): refusing it")

    def _lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=self.fd)
        except OSError as exc:
            raise StateDirError(f"cannot open {self.path / LOCK_NAME}: {os.strerror(exc.errno or 0)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirError(f"another xenemu daemon (pid {holder}) serves {self.path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def close(self) -> None:
        """Give the directory up (the lock file stays: unlinking it would race the next daemon)."""
        for fd in (self.lock_fd, self.fd):
            os.close(fd)


def listen(path: Path, mode: int) -> trio.SocketListener:
    """A socket listening at ``path`` with permissions ``mode``, never reachable with others.

    It is bound in a private directory made for it (``0700``, inside the state directory) with
    the umask that gives ``mode``, then renamed into place, so a client that sees the socket
    file can connect to it and no path an attacker could swap is ever chmod-ed. The bind is a
    plain synchronous call on this thread, so the umask is changed only for its duration."""
    private = Path(tempfile.mkdtemp(prefix=".bind-", dir=path.parent))
    staged = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):  # the umask is what counts; the mode is checked after
            os.fchmod(sock.fileno(), mode)  # the socket inode's mode, where the platform honours it
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(staged))
        finally:
            os.umask(old_umask)
        got = stat.S_IMODE(os.lstat(staged).st_mode)
        if got != mode:
            raise OSError(errno.EPERM, f"{path.name} was bound with mode {got:04o}, not {mode:04o}")
        sock.listen(128)
        os.replace(staged, path)
    except BaseException:
        sock.close()
        staged.unlink(missing_ok=True)
        raise
    finally:
        os.rmdir(private)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class Admission:
    """The live sessions, and the rules for joining them."""

    def __init__(self, host: Host, limits: Limits) -> None:
        self.host = host
        self.limits = limits
        self.sessions: set[Session] = set()
        #: Hypercall sessions that have not said hello, oldest first.
        self.awaiting: dict[Session, None] = {}
        self.evicted = 0
        self._next_peer = 1
        #: Told of each session that has just said hello (the daemon hands it what waited).
        self.on_hello: Callable[[Session], None] | None = None

    async def accept(
        self, listener: trio.SocketListener, channel: Channel, nursery: trio.Nursery, serve: ConnectionHandler
    ) -> None:
        """Accept connections on ``listener`` for ever, each run by ``serve`` in ``nursery``."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.warning("accept failed", channel=channel, error=errno.errorcode.get(exc.errno or 0, "?"))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(serve, stream, channel)

    async def admit(self, stream: trio.SocketStream, channel: Channel) -> Session | None:
        """A session for a new connection, its hello clock running; or none, the connection
        refused and closed, when the control socket has too many already. A hypercall
        connection is always admitted: if too many are waiting to say hello, the oldest goes."""
        session = Session(stream, channel, self._next_peer, self.limits)
        self._next_peer += 1
        if channel == "control":
            if sum(1 for s in self.sessions if s.channel == "control") >= self.limits.max_control_connections:
                await self._refuse_at_the_door(session, "too many control connections")
                return None
        else:
            while len(self.awaiting) >= self.limits.max_awaiting_hello:
                oldest = next(iter(self.awaiting))
                del self.awaiting[oldest]
                self.evicted += 1
                oldest.log_closed("evicted: too many connections waiting to say hello")
                oldest.evict()
            self.awaiting[session] = None
        self.sessions.add(session)
        session.started = trio.current_time()
        session.hello_deadline = session.started + self.limits.hello_timeout
        return session

    async def _refuse_at_the_door(self, session: Session, reason: str) -> None:
        session.warn("refused", channel=session.channel, error="-EMFILE", reason=reason)
        try:
            with trio.move_on_after(DOOR_SEND_TIMEOUT):
                await session.stream.send_all(encode(error_reply(None, -EMFILE, reason)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it hung up already
        finally:
            await session.stream.aclose()

    def leave(self, session: Session) -> None:
        """The session has ended: it no longer counts, nor receives events."""
        self.sessions.discard(session)
        self.awaiting.pop(session, None)

    async def hello(self, session: Session, req_id: int | None, op: Any, args: Any) -> None:
        """A session's first request: it must be hello, in our version, naming a domain that
        has room for one more connection; then the session speaks for that domain."""
        if op != "hello" or not isinstance(args, dict):
            await session.refuse(req_id, -EPROTO, "the first request must be hello", close=True, op=op)
            return
        version = args.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
            await session.refuse(
                req_id, -EPROTONOSUPPORT, f"protocol version {clip(version)!r} unsupported", close=True, op=op
            )
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
            ready = [s for s in self.sessions if s.domain is not None and s.channel == "hypercall"]
            if len(ready) >= self.limits.max_connections:
                await session.refuse(req_id, -EMFILE, f"{len(ready)} hypercall connections", close=True, op=op)
                return
            peers = sum(1 for s in ready if s.domain is dom)
            if peers >= self.limits.max_connections_per_domain:
                await session.refuse(req_id, -EMFILE, f"d{dom.domid} has {peers} connections", close=True, op=op)
                return
        session.domain = dom
        self.awaiting.pop(session, None)
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
        if self.on_hello is not None:
            self.on_hello(session)

    def domain_for_token(self, token: Any) -> Domain | None:
        """The domain whose token this is, compared in constant time against every domain."""
        if not isinstance(token, str):
            return None
        found = None
        for dom in self.host.domains.values():
            if hmac.compare_digest(dom.token.encode(), token.encode("utf-8", "replace")):
                found = dom
        return found

    def describe(self) -> dict[str, Any]:
        """The daemon's own accounting of its connections (the control request ``connections``)."""
        now = trio.current_time()
        rows = [
            {
                "peer": s.peer,
                "channel": s.channel,
                "domid": s.domain.domid if s.domain else None,
                "queued_events": s.queued,
                "age": round(now - s.started, 3),
            }
            for s in sorted(self.sessions, key=lambda s: s.peer)
        ]
        return {"ret": 0, "connections": rows, "awaiting_hello": len(self.awaiting), "evicted": self.evicted}
