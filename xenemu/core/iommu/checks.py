"""What every subop handler shares: the op view's type and the page-order check."""

from __future__ import annotations

from typing import Any

from xenemu.abi import pv_iommu as pv
from xenemu.core.iommu.state import Iommu

Op = Any  # a cffi `struct pv_iommu_op` view


def order_of(iommu: Iommu, flags: int) -> int | None:
    """The op's page order, or None if the host offers no such order (-ENOSPC)."""
    order = flags >> pv.ORDER_SHIFT
    return None if order > iommu.options.largest_order else order
