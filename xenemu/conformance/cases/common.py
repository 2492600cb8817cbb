"""Small helpers the cases share."""

from __future__ import annotations

from xenemu.abi import pv_iommu as ops
from xenemu.conformance.target import Bed

#: dom0's device for the hardware domain's rules: assigned once, kept (devices stay assigned
#: until their domain is destroyed, and dom0 is never destroyed).
HWDOM_BDF = "00:02.0"
EBUSY = -16


def st(bed: Bed, domid: int, op: ops.Op) -> str:
    """The status name of one op run alone."""
    return bed.call(domid, [op])[0].status_name


def one(bed: Bed, domid: int, op: ops.Op) -> ops.Op:
    return bed.call(domid, [op])[0]


def hwdom_device(bed: Bed) -> None:
    """Give dom0 a device (its IOMMU context); one an earlier case gave it is as good."""
    ret = bed.assign(0, HWDOM_BDF)
    assert ret in (0, EBUSY), f"assign_device(0, {HWDOM_BDF}) returned {ret}"
