"""Grant-table hypercalls: the granter's entries, and batched map/unmap by the mapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from xenemu.core.actions.base import Action, Outcome, handles
from xenemu.core.host import Host


@dataclass(frozen=True)
class GrantAccess(Action):
    """Write grant entry ``ref``: ``domid`` may map the caller's ``gfn`` (read-only or not)."""

    name = "grant_access"
    ref: int
    domid: int
    gfn: int
    readonly: bool = False


@handles(GrantAccess)
def _grant_access(host: Host, caller: int, action: GrantAccess) -> dict[str, Any]:
    host.grants.grant_access(caller, action.ref, action.domid, action.gfn, action.readonly)
    return {"ret": 0}


@dataclass(frozen=True)
class EndAccess(Action):
    """Revoke grant entry ``ref`` (``-EBUSY`` while mapped)."""

    name = "end_access"
    ref: int


@handles(EndAccess)
def _end_access(host: Host, caller: int, action: EndAccess) -> dict[str, Any]:
    host.grants.end_access(caller, action.ref)
    return {"ret": 0}


@dataclass(frozen=True)
class GrantTableOp(Action):
    """``GNTTABOP_map_grant_ref`` / ``unmap_grant_ref`` on ``count`` packed structs in ``buf``."""

    name = "grant_table_op"
    cmd: Literal["map_grant_ref", "unmap_grant_ref"]
    buf: bytes
    count: int


@handles(GrantTableOp)
def _grant_table_op(host: Host, caller: int, action: GrantTableOp) -> Outcome:
    buf = bytearray(action.buf)
    grants = host.grants
    run = grants.mapping if action.cmd == "map_grant_ref" else grants.unmapping
    ret = yield from run(caller, buf, action.count)
    return {"ret": ret, "buf": bytes(buf)}
