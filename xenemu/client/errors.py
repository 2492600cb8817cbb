"""What a client raises: the daemon's refusals as ``OSError``s, and the daemon going away.

A refusal is an ``OSError`` with the errno Xen would return (positive, as ``errno`` has it), so
a caller writes ``except OSError as exc: if exc.errno == errno.EBUSY`` as it would around libxc;
``str()`` names the errno (``EINVAL``), as ``xl`` prints it. A connection the daemon closes (it
died, restarted, or dropped this peer) is ``ConnectionLost`` whatever the socket call was that
noticed it, so no caller has to know ``BrokenPipeError`` from ``ConnectionResetError`` from EOF.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from xenemu.abi.errno import NAMES

Message = dict[str, Any]


class XenError(OSError):
    """A request the daemon refused.

    ``errno`` is positive (``errno.EINVAL``), ``ret`` the negated value the wire carried,
    ``name`` the errno's name (``"EINVAL"``), ``strerror`` the C library's text for it,
    ``message`` the daemon's own detail, and ``op`` the request.
    """

    def __init__(self, errno: int, message: str = "", op: str = "") -> None:
        super().__init__(errno, os.strerror(errno))
        self.name = NAMES.get(errno) or _errno.errorcode.get(errno, str(errno))
        self.message = message
        self.op = op

    @property
    def ret(self) -> int:
        """The value as the wire and ``do_iommu_op`` return it: ``-errno``."""
        return -(self.errno or 0)

    def __str__(self) -> str:
        detail = f" ({self.message})" if self.message else ""
        return f"{self.op or 'request'} failed: {self.name}{detail}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.message, self.op))


class ConnectionLost(ConnectionError):
    """The daemon closed the connection, or the socket to it broke (xenemu keeps no state across
    a daemon restart: a new connection needs a new token)."""


def checked(reply: Message, op: str) -> Message:
    """The reply, or ``XenError`` if it carries a negative ``ret`` (a non-integer is ``EIO``)."""
    ret = reply.get("ret", 0)
    if not isinstance(ret, int) or isinstance(ret, bool):
        raise XenError(5, "reply without an integer ret", op)
    if ret < 0:
        raise XenError(-ret, str(reply.get("message", ""))[:256], op)
    return reply
