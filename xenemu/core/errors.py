"""What a failing hypercall raises: ``HypercallError`` carrying one of the ABI's errno values.

The values themselves are ABI facts (``xenemu.abi.errno``); they are re-exported here so a
core module names its failures with one import.
"""

from __future__ import annotations

from xenemu.abi.errno import (
    E2BIG,
    EACCES,
    EBADMSG,
    EBUSY,
    EDQUOT,
    EEXIST,
    EINVAL,
    EIO,
    EMFILE,
    EMSGSIZE,
    ENODEV,
    ENOENT,
    ENOMEM,
    ENOSPC,
    ENXIO,
    EOPNOTSUPP,
    EPERM,
    EPROTO,
    EPROTONOSUPPORT,
    ESRCH,
    ETIMEDOUT,
    errno_name,
)

__all__ = [
    "E2BIG",
    "EACCES",
    "EBADMSG",
    "EBUSY",
    "EDQUOT",
    "EEXIST",
    "EINVAL",
    "EIO",
    "EMFILE",
    "EMSGSIZE",
    "ENODEV",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "ENXIO",
    "EOPNOTSUPP",
    "EPERM",
    "EPROTO",
    "EPROTONOSUPPORT",
    "ESRCH",
    "ETIMEDOUT",
    "HypercallError",
    "errno_name",
]


class HypercallError(Exception):
    """A call-level failure: the whole call returns ``-errno`` and changes nothing."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or errno_name(-errno))
        self.errno = errno
        self.message = message or errno_name(-errno)
