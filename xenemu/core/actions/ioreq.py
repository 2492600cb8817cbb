"""An emulator's IOREQ servers: creating and destroying them, and its side of their ring."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any

from xenemu.core.actions.base import Action, Outcome, handles
from xenemu.core.errors import EINVAL, ENOENT, HypercallError
from xenemu.core.host import Host


@dataclass(frozen=True)
class CreateIoreqServer(Action):
    name = "create_ioreq_server"
    target: int


@handles(CreateIoreqServer)
def _create_ioreq_server(host: Host, caller: int, action: CreateIoreqServer) -> dict[str, Any]:
    server = host.emulators.create_server(caller, action.target)
    return {"ret": 0, "ioserver": server.id}


@dataclass(frozen=True)
class DestroyIoreqServer(Action):
    name = "destroy_ioreq_server"
    ioserver: int


@handles(DestroyIoreqServer)
def _destroy_ioreq_server(host: Host, caller: int, action: DestroyIoreqServer) -> Outcome:
    yield from host.emulators.destroying_server(caller, action.ioserver)
    return {"ret": 0}


#: Synchronous requests one ``ioreq_fetch`` returns (lowest ids first; ``more`` says others wait).
MAX_FETCH = 4096


@dataclass(frozen=True)
class IoreqFetch(Action):
    """The emulator reads its shared pages: the buffered ring and the pending synchronous requests."""

    name = "ioreq_fetch"
    ioserver: int


@handles(IoreqFetch)
def _ioreq_fetch(host: Host, caller: int, action: IoreqFetch) -> dict[str, Any]:
    server = host.emulators.own_server(caller, action.ioserver)
    first = list(islice(server.pending.items(), MAX_FETCH))  # ids rise in the order sent
    return {
        "ret": 0,
        "page": bytes(server.page),
        "sync": [[req_id, bytes(req)] for req_id, req in first],
        "more": len(server.pending) > len(first),
    }


@dataclass(frozen=True)
class IoreqAck(Action):
    """The emulator consumed its buffered ring up to ``read_pointer``."""

    name = "ioreq_ack"
    ioserver: int
    read_pointer: int


@handles(IoreqAck)
def _ioreq_ack(host: Host, caller: int, action: IoreqAck) -> dict[str, Any]:
    server = host.emulators.own_server(caller, action.ioserver)
    if not server.acknowledge(action.read_pointer):
        raise HypercallError(-EINVAL, "read_pointer beyond the write pointer")
    return {"ret": 0}


@dataclass(frozen=True)
class IoreqComplete(Action):
    """The emulator answers a synchronous request (its state becomes STATE_IORESP_READY)."""

    name = "ioreq_complete"
    ioserver: int
    id: int


@handles(IoreqComplete)
def _ioreq_complete(host: Host, caller: int, action: IoreqComplete) -> dict[str, Any]:
    server = host.emulators.own_server(caller, action.ioserver)
    if not server.complete(action.id):
        raise HypercallError(-ENOENT, f"no pending request {action.id}")
    return {"ret": 0}


@dataclass(frozen=True)
class ReleaseIoreqServers(Action):
    """Raised by the shell when a domain's last connection closes: its emulator is gone."""

    name = "release_ioreq_servers"
    channel = "internal"
    domid: int


@handles(ReleaseIoreqServers)
def _release_ioreq_servers(host: Host, caller: int, action: ReleaseIoreqServers) -> Outcome:
    released = yield from host.emulators.releasing_servers(action.domid)
    return {"ret": released}
