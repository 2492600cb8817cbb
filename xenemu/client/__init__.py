"""Python client for xenemu's two sockets: async (trio) for programs, blocking for scripts.

Both transports share one API definition (``api``): each method names a request and how to
read its reply, typed for either transport, and the transport decides whether that is awaited
or returned at once. Refusals are ``XenError`` (an ``OSError`` with the errno), a daemon that
goes away is ``ConnectionLost`` (``errors``).

    async with await HypercallClient.connect(path, token) as xc:
        done = await xc.iommu_op([ops.query_caps()])

    with SyncHypercallClient.connect(path, token) as xc:
        done = xc.iommu_op([ops.query_caps()])
"""

from __future__ import annotations

from xenemu.client.api import ControlApi, HypercallApi, Request
from xenemu.client.errors import ConnectionLost, XenError
from xenemu.client.transport import ControlClient, HypercallClient, SyncControlClient, SyncHypercallClient

__all__ = [
    "ConnectionLost",
    "ControlApi",
    "ControlClient",
    "HypercallApi",
    "HypercallClient",
    "Request",
    "SyncControlClient",
    "SyncHypercallClient",
    "XenError",
]
