"""An IOMMU page-table entry: one 64-bit integer, ``mfn << 8 | kind << 2 | perms``.

The kind records who put the entry there (and so who may remove it and what references it
holds); the flush types are seed 002's, ordered so a batch flushes once, at the highest.
"""

from __future__ import annotations

from enum import IntEnum

PERM_R = 1
PERM_W = 2
PERM_MASK = 3


class Kind(IntEnum):
    """Who put an entry there, which decides who may remove it and what it holds."""

    DEFAULT = 1  # Xen's, for PV-IOMMU-unaware guests; no reference
    MAP = 2  # map_page; holds a general (+ writable-type if W) reference
    MAP_NOREF = 3  # map_page with no_ref_cnt; holds nothing
    FOREIGN = 4  # owned by an M2B entry, which holds the references
    SCRATCH = 5  # a swapped foreign mapping, pointing at the scratch frame
    RMRR = 6  # identity-mapped reserved region of an assigned device
    GRANT = 7  # grant map at a caller-chosen BFN; holds references
    DOORBELL = 8  # the ITS doorbell (GITS_TRANSLATER) at the guest's vITS translation frame


def make_entry(mfn: int, kind: Kind, perms: int) -> int:
    return (mfn << 8) | (kind << 2) | perms


def entry_mfn(entry: int) -> int:
    return entry >> 8


def entry_kind(entry: int) -> Kind:
    return Kind((entry >> 2) & 15)


def entry_perms(entry: int) -> int:
    return entry & PERM_MASK


class FlushType(IntEnum):
    """Seed 002's flush types, ordered so that the batch flushes at the highest."""

    NONE = 0
    ADDED = 1
    MODIFIED = 2


RW = PERM_R | PERM_W
