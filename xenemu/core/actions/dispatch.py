"""The one dispatch: a wire request becomes a typed action, and every action runs the same way.

Every request, whoever sends it, becomes one ``Action`` instance (``parse``) and goes through
``dispatch``.  A handler may be a plain function or a generator that yields at continuation
points; ``dispatch`` always hands the shell a generator, so the shell has one way to run,
preempt and resume any request.  A new hypercall family is a module of actions (importing
``base``) plus one import here.
"""

from __future__ import annotations

import inspect
from typing import Any

from xenemu.core.actions import control, grant, iommu, ioreq, its, memory, migration
from xenemu.core.actions.base import ACTIONS, HANDLERS, Action, Channel, Outcome
from xenemu.core.errors import EBUSY, EOPNOTSUPP, EPERM, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu import preempt
from xenemu.core.migration import vits

__all__ = ["ACTIONS", "Action", "Channel", "Outcome", "dispatch", "parse", "run"]


def parse(name: Any, args: Any, channel: Channel) -> Action:
    """The typed action for a wire request, or ``-EOPNOTSUPP``/``-EPERM``/``-EINVAL``."""
    cls = ACTIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise HypercallError(-EOPNOTSUPP, f"unknown request {name!r}")
    if cls.channel != channel:
        raise HypercallError(-EPERM, f"{name} is not available on the {channel} socket")
    return cls.from_wire(args)


def dispatch(host: Host, caller: int, action: Action) -> Outcome:
    """Run ``action``: a generator yielding effects and returning the result."""
    if host.suspended:
        _refuse_suspended(host, caller, action)
    handler = HANDLERS[type(action)]
    if inspect.isgeneratorfunction(handler):
        result = yield from handler(host, caller, action)
        return result
    return handler(host, caller, action)


#: Requests that name a stopped domain and still run: destroying it, starting its migration
#: afresh (which first abandons the one that stopped it), the shell releasing the IOREQ servers
#: of a domain whose last connection closed, and the toolstack's reads.
UNSTOPPED = (
    control.DestroyDomain,
    migration.MigrateBegin,
    ioreq.ReleaseIoreqServers,
    control.DomainToken,
    control.DumpMappings,
    control.FrameInfo,
    its.ItsInfo,
)


def _refuse_suspended(host: Host, caller: int, action: Action) -> None:
    """A domain stopped for migration (or being received) runs nothing, and nothing may change
    it: its own calls and any request naming it are ``-EBUSY`` ("try again": the stop is the
    migration's last tens of milliseconds), except ``UNSTOPPED`` and the migration's other
    requests (which name a migration, not a domain)."""
    if host.resuming:
        vits.resume_received(host)  # a received domain whose vITS has caught up runs now
    if caller in host.suspended:
        raise HypercallError(-EBUSY, f"d{caller} is suspended for migration: try again")
    target = getattr(action, "domid", None)
    if type(target) is int and target in host.suspended and not isinstance(action, UNSTOPPED):
        raise HypercallError(-EBUSY, f"d{target} is suspended for migration: try again")


def run(host: Host, caller: int, action: Action) -> Any:
    """Run an action to completion, ignoring continuation points (tests, scripts)."""
    return preempt.drain(dispatch(host, caller, action))


#: The hypercall families; importing each registered its actions' handlers.
FAMILIES = (control, grant, iommu, ioreq, its, memory, migration)
