"""The daemon: the rooms composed into one process, and what belongs to none of them.

It owns the daemon's life (claiming its state directory, listening on both sockets, then
shutting down on a signal or on request, in-flight requests given ``Limits.shutdown_grace`` to
finish and their peers a second to take what is sent to them), the answering of one
request once its session has said hello (parse, run through the scheduler, reply), the
pITS hardware ticker, and the notifications that follow every change of host state: IOREQ
news and LPIs posted to the emulators' sessions, dropped ITS commands logged, parked
requests woken. It also releases a domain's IOREQ servers when its last emulator
connection closes, and tunes the C heap for big frames before it starts.

It owns no hypervisor semantics: a message becomes a typed action (``dispatch.parse``) and
the core does the rest. This is the top room; it imports the other three.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from xenemu.core.actions.control import DestroyDomain, ListDomains
from xenemu.core.actions.dispatch import Channel, dispatch, parse
from xenemu.core.actions.ioreq import ReleaseIoreqServers
from xenemu.core.errors import EINVAL, EIO, EOPNOTSUPP, EPROTO, ESRCH, HypercallError
from xenemu.core.host import Host
from xenemu.logs import RECENT, RING_LINES
from xenemu.server import mutants
from xenemu.server.admission import Admission, StateDir, listen
from xenemu.server.limits import Limits, LogBudget
from xenemu.server.scheduler import Scheduler
from xenemu.server.session import Session, Unheard, clip, error_reply
from xenemu.wire import MAX_FRAME, Message

log = structlog.get_logger("xenemu")

MAX_REQUEST_ID = 2**32 - 1
#: How often the pITS model advances while it has work, and while idle.
ITS_TICK = 0.0005
ITS_IDLE_TICK = 0.01
#: Commands a pITS model runs at one go (about a millisecond of the daemon's time); the
#: hardware time left over is kept, so it runs on at the next tick.
ITS_HARDWARE_SLICE = 256
#: Requests the shell answers itself, on the control socket (the daemon's own accounting).
SHELL_REQUESTS = frozenset({"connections", "dmesg"})


class Daemon:
    """One host served over a control socket (the toolstack) and a hypercall socket (guests)."""

    def __init__(
        self,
        host: Host,
        control_path: Path,
        hypercall_path: Path,
        limits: Limits | None = None,
        state: StateDir | None = None,
    ) -> None:
        """``state``: the state directory, already claimed (else ``serve`` claims it)."""
        self.host = host
        self.state = state
        self.limits = limits or Limits()
        self.control_path = control_path
        self.hypercall_path = hypercall_path
        self.admission = Admission(host, self.limits)
        #: The live sessions (the admission room keeps them; this is the same set).
        self.sessions: set[Session] = self.admission.sessions
        #: Log budgets of the guests whose ITS commands the pITS dropped (by domid).
        self._its_log: dict[int, LogBudget] = {}
        #: LPIs given to a domain while no program of it was connected, for its next hello.
        self._unheard = Unheard(self.limits.max_queued_events)
        self.admission.on_hello = self._unheard.hand_over
        self.stopping = False
        self._accepting: trio.Nursery | None = None
        self.scheduler = Scheduler(host, self._state_changed)
        self._its_kick = trio.Event()
        self._its_last = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    async def serve(self, *, handle_signals: bool = True, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on both sockets until shut down; in-flight requests finish first."""
        claimed = [] if self.state is not None else [StateDir(self.control_path.parent)]
        try:
            if self.hypercall_path.parent != self.control_path.parent:
                claimed.append(StateDir(self.hypercall_path.parent))
            await self._serve(handle_signals, task_status)
        finally:
            for state in claimed:
                state.close()

    async def _serve(self, handle_signals: bool, task_status: Any) -> None:
        control = listen(self.control_path, 0o600)
        hypercall = listen(self.hypercall_path, 0o666)
        log.info(
            "listening",
            control=str(self.control_path),
            hypercall=str(self.hypercall_path),
            frames=self.host.frames.nr_frames,
            iommu=self.host.options.iommu,
        )
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    self._accepting = accepting
                    if handle_signals:
                        accepting.start_soon(self._watch_signals)
                    accepting.start_soon(self.admission.accept, control, "control", connections, self._serve_connection)
                    accepting.start_soon(
                        self.admission.accept, hypercall, "hypercall", connections, self._serve_connection
                    )
                    accepting.start_soon(self._run_its_hardware)
                    task_status.started(self)
                # accepting has stopped: connections finish their current request and close
                for session in list(self.sessions):
                    session.shutdown()
                connections.cancel_scope.deadline = trio.current_time() + self.limits.shutdown_grace
        finally:
            for path in (self.control_path, self.hypercall_path):
                path.unlink(missing_ok=True)
            log.info("stopped")

    async def _run_its_hardware(self) -> None:
        """The pITSs run on their own: let their time pass, take their interrupts, run passes.
        A request that gives a pITS work wakes this task at once. Passes still raised (a request,
        like this task, runs at most ``MAX_ROUNDS`` rounds of them) run here next, after every
        other task ready to run has had its turn: a flooded queue's translation is cut into
        small pieces that other guests' requests go between."""
        its = self.host.its
        while True:
            if its.raised:
                await trio.sleep(0)  # every request ready to run goes first, then the next piece
            else:
                busy = its.hardware_busy()
                with trio.move_on_after(ITS_TICK if busy else ITS_IDLE_TICK):
                    await self._its_kick.wait()
            self._its_kick = trio.Event()
            self._its_catch_up()
            its.run_passes()
            if its.deliveries or its.drops:
                self._state_changed()

    def _its_catch_up(self) -> None:
        """Hardware time passes between requests: run what the pITSs did since, take their LPIs."""
        its = self.host.its
        now = trio.current_time()
        its.advance(now - self._its_last, ITS_HARDWARE_SLICE)
        self._its_last = now
        its.deliver()

    def shutdown(self) -> None:
        """Stop accepting; connections finish their current request and close."""
        if not self.stopping:
            self.stopping = True
            log.info("shutting down", sessions=len(self.sessions))
            if self._accepting is not None:
                self._accepting.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                self.shutdown()
                return

    # -- connections ------------------------------------------------------------------------------
    async def _serve_connection(self, stream: trio.SocketStream, channel: Channel) -> None:
        """One connection's life through the rooms: admitted, served, gone, its servers released."""
        session = await self.admission.admit(stream, channel)
        if session is None:
            return
        try:
            await session.serve(self._handle, lambda: self.stopping)
        finally:
            self.admission.leave(session)
            self._unheard.left(session, self.sessions, self.host.domains)
            # even past the shutdown deadline, but never for ever
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.limits.shutdown_grace):
                await stream.aclose()
                log.debug("disconnected", peer=session.peer, domid=session.domain.domid if session.domain else None)
                try:
                    await self._after_disconnect(session)
                except Exception:  # a bug: logged, and the daemon goes on serving everyone else
                    log.exception("release after disconnect failed", peer=session.peer)

    async def _after_disconnect(self, session: Session) -> None:
        """A domain whose last connection closed has no emulator left: release its servers.
        Its caller shields it from cancellation: the release is plain work, done whole."""
        dom = session.domain
        if session.channel != "hypercall" or dom is None or self.host.domains.get(dom.domid) is not dom:
            return
        if any(s.domain is dom and s.channel == "hypercall" for s in self.sessions):
            return
        if not any(server.creator == dom.domid for server in self.host.ioreq.servers.values()):
            return
        released = await self.scheduler.run(dispatch(self.host, dom.domid, ReleaseIoreqServers(dom.domid)))
        log.info("released ioreq servers", domid=dom.domid, servers=released["ret"])

    async def _handle(self, session: Session, message: Message) -> None:
        """Answer one decoded request: hello until the session has a domain, then actions."""
        req_id = message.get("id")
        if req_id is not None and not (type(req_id) is int and 0 <= req_id <= MAX_REQUEST_ID):  # not a bool
            await session.refuse(None, -EINVAL, "id must be an unsigned 32-bit integer")
            return
        op = message.get("op")
        args = message.get("args", {})
        if session.domain is None:
            await self.admission.hello(session, req_id, op, args)
            return
        if op == "hello":
            await session.refuse(req_id, -EPROTO, "already said hello")
            return
        if not isinstance(op, str):
            await session.refuse(req_id, -EOPNOTSUPP, f"unknown request {clip(op)}", op=op)
            return
        if op in SHELL_REQUESTS and session.channel == "control":
            await session.send({"id": req_id, **self._shell_request(op, args)})
            return
        dom = session.domain
        if self.host.domains.get(dom.domid) is not dom:
            await session.refuse(req_id, -ESRCH, f"d{dom.domid} no longer exists", close=True)
            return
        started = time.perf_counter()
        if self.host.its.commands_queued():
            self._its_catch_up()  # what a guest reads of the ITS reflects the time that passed
        try:
            action = parse(op, args, session.channel)
            result = await self.scheduler.run(dispatch(self.host, dom.domid, action), dom.domid)
        except HypercallError as exc:
            await session.refuse(req_id, exc.errno, exc.message, op=op)
            return
        except trio.Cancelled:
            log.warning("request cut", peer=session.peer, domid=dom.domid, op=clip(op), reason="shutdown grace over")
            raise
        except Exception:
            log.exception("internal error", peer=session.peer, domid=dom.domid, op=clip(op))
            await session.send(error_reply(req_id, -EIO, "internal error"))
            return
        log.debug(
            "hypercall" if session.channel == "hypercall" else "control",
            domid=dom.domid,
            op=op,
            ret=result.get("ret"),
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        if isinstance(action, ListDomains):
            self._annotate(result["domains"])
        reply: Message = {"id": req_id, **result}
        await session.send(reply)
        if isinstance(action, DestroyDomain):
            self.scheduler.seconds.pop(action.domid, None)
            self._disconnect_domain(action.domid)

    def _shell_request(self, op: str, args: Any) -> Message:
        """What the shell itself knows: its connections, and its recent log (``xl dmesg``)."""
        if op == "dmesg":
            count = args.get("lines", 1000) if isinstance(args, dict) else None
            if type(count) is not int or not 0 <= count <= RING_LINES:  # not a bool
                refusal = error_reply(None, -EINVAL, f"lines must be 0..{RING_LINES}")
                refusal.pop("id")
                return refusal
            return {"ret": 0, "lines": RECENT.last(count), "dropped": RECENT.dropped}
        return self.admission.describe()

    def _annotate(self, domains: list[dict[str, Any]]) -> None:
        """What ``xl list`` shows that only the shell knows: connected programs (the state
        letter) and the seconds the hypervisor has spent on the domain's requests (Time)."""
        for d in domains:
            d["connections"] = sum(
                1 for s in self.sessions if s.channel == "hypercall" and s.domain and s.domain.domid == d["domid"]
            )
            d["time_s"] = round(self.scheduler.seconds.get(d["domid"], 0.0), 3)

    def _state_changed(self) -> None:
        """Deliver IOREQ news to emulators and wake every request waiting on host state."""
        for ioserver in sorted(self.host.ioreq.notify):
            server = self.host.ioreq.get(ioserver)
            if server is None:
                continue
            for session in self.sessions:
                if session.channel == "hypercall" and session.domain and session.domain.domid == server.creator:
                    session.post(ioserver)
        self.host.ioreq.notify.clear()
        if self.host.its.commands_queued():
            self._its_kick.set()
        drops, deliveries = self.host.its.take_events()
        for domid, pits, offset, command, error in drops:
            budget = self._its_log.setdefault(domid, LogBudget())  # a guest's bad commands, rated
            if (dropped := budget.take()) is not None:
                log.warning(
                    "its command dropped",
                    domid=domid,
                    pits=pits,
                    offset=offset,
                    command=command,
                    error=f"E_ITS_{error}",
                    **({"dropped_before": dropped} if dropped else {}),
                )
        for delivery in deliveries:
            heard = False
            for session in self.sessions:
                if session.channel == "hypercall" and session.domain and session.domain.domid == delivery.domid:
                    session.post_lpi(delivery.vcpu, delivery.intid)
                    heard = True
            if not heard and (dom := self.host.domains.get(delivery.domid)) is not None:
                self._unheard.hold(dom, [(delivery.vcpu, delivery.intid)])
        self.scheduler.wake()

    def _disconnect_domain(self, domid: int) -> None:
        """A destroyed domain's emulator connections close once their current request is done."""
        self._its_log.pop(domid, None)
        self._unheard.forget(domid)
        for session in list(self.sessions):
            if session.channel == "hypercall" and session.domain is not None and session.domain.domid == domid:
                session.close_soon()


#: glibc's mallopt parameters: sizes above M_MMAP_THRESHOLD get their own mapping, and free
#: memory above M_TRIM_THRESHOLD at the heap's top goes back to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_frame_buffers_warm() -> bool:
    """Have glibc keep freed multi-MiB buffers instead of unmapping them after every batch.

    A 65,536-op batch is a 2 MiB frame copied a few times on its way in and out; with glibc's
    defaults each copy lands in freshly mapped memory and page-faults its 512 pages, which
    costs a millisecond of uninterruptible time per copy, and every other guest waits behind
    it. Holding up to 64 MiB of free heap makes those copies plain memcpy. A no-op elsewhere.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 2 * MAX_FRAME + (1 << 20)) and mallopt(M_TRIM_THRESHOLD, 64 << 20))


def freeze_startup_objects() -> int:
    """Take what a started daemon holds for good out of the cyclic collector's full collections.

    A full (generation 2) collection walks every GC-tracked object, and no work budget counts
    it: the modules, classes and functions of a started daemon are some 40K such objects, which
    cost 15-30 ms on a busy two-core machine per full collection, a stall every other domain
    sees.  ``gc.freeze()`` (CPython's advice for long-lived processes once started) moves them to
    a generation that is never collected.  Garbage is collected first so none is frozen; objects
    made afterwards, the cyclic garbage trio and exceptions leave included, are collected as
    ever.  Only the ``serve`` command calls it: a test process running many daemons must not
    freeze what each test leaves behind.  Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def run_daemon(
    host: Host,
    directory: Path,
    *,
    handle_signals: bool = True,
    started: Callable[[Daemon], Awaitable[None]] | None = None,
    limits: Limits | None = None,
    state: StateDir | None = None,
) -> None:
    """Serve ``host`` on ``directory``/control.sock and hypercall.sock until shut down;
    ``started`` runs once both sockets accept connections. ``state``: ``directory`` already
    claimed (``StateDir``), else the daemon claims it (``StateDirError`` if it may not)."""
    keep_frame_buffers_warm()
    mutants.apply_from_environment(host)  # the conformance self-test's broken daemons only
    daemon = Daemon(host, directory / "control.sock", directory / "hypercall.sock", limits, state)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: daemon.serve(handle_signals=handle_signals, task_status=task_status))
        if started is not None:
            await started(daemon)
