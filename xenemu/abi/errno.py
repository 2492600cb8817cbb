"""Errno values as the ABI defines them (Xen's, which are Linux's), and their names.

Shared by the core (which returns them), the wire codec and the client (which print them):
one table, so a status reads the same everywhere.
"""

from __future__ import annotations

from xenemu.abi import const

EPERM = const("XEN_EPERM")
ENOENT = const("XEN_ENOENT")
ESRCH = const("XEN_ESRCH")
EIO = const("XEN_EIO")
ENXIO = const("XEN_ENXIO")
E2BIG = const("XEN_E2BIG")
ENOMEM = const("XEN_ENOMEM")
EACCES = const("XEN_EACCES")
EBUSY = const("XEN_EBUSY")
EEXIST = const("XEN_EEXIST")
ENODEV = const("XEN_ENODEV")
EINVAL = const("XEN_EINVAL")
ENOSPC = const("XEN_ENOSPC")
EOPNOTSUPP = const("XEN_EOPNOTSUPP")
EDQUOT = const("XEN_EDQUOT")
EMFILE = const("XEN_EMFILE")
ETIMEDOUT = const("XEN_ETIMEDOUT")
EPROTO = const("XEN_EPROTO")
EBADMSG = const("XEN_EBADMSG")
EMSGSIZE = const("XEN_EMSGSIZE")
EPROTONOSUPPORT = const("XEN_EPROTONOSUPPORT")

NAMES: dict[int, str] = {
    value: name
    for name, value in globals().copy().items()
    if name.isupper() and name.startswith("E") and isinstance(value, int)
}


def errno_name(status: int) -> str:
    """`0` -> "OK", `-22` -> "-EINVAL"; unknown values print as numbers."""
    if status == 0:
        return "OK"
    name = NAMES.get(-status)
    return f"-{name}" if name else str(status)
