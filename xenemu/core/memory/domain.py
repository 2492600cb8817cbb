"""A domain as the memory subsystem knows it: identity, kind, RAM (p2m), privilege and quotas.

Other subsystems keep their per-domain state themselves, keyed by domid (the IOMMU its
contexts, the grant code its tables, the ITS its vITSs), so this record depends on nothing
above memory and each subsystem can be read alone.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from xenemu.abi import const
from xenemu.core.memory.p2m import P2M
from xenemu.core.options import DomainKind

DOMID_SELF = const("DOMID_SELF")
DOMID_FIRST_RESERVED = const("DOMID_FIRST_RESERVED")
HWDOM_ID = 0


@dataclass
class Domain:
    domid: int
    kind: DomainKind
    is_hwdom: bool = False
    #: The one domain a device-model domain is privileged over.
    target: int | None = None
    #: HVM only: GFN -> MFN.  A PV domain's GFN *is* its MFN.
    p2m: P2M = field(default_factory=P2M)
    #: Frames populated for this domain (HVM: len(p2m)).
    pages: int = 0
    #: The most it may populate (Xen's ``max_pages``): set at creation, changed by the toolstack
    #: (``set_max_pages``, ``xl mem-set``); ``populate_physmap`` beyond it is ``-ENOMEM``.
    max_pages: int = 0
    devices: set[str] = field(default_factory=set)
    name: str = ""
    #: Quota of mappings it may hold (map_page, M2B entries as mapper, grant mappings).
    max_mappings: int = 1 << 22
    #: Its own ops of many pages paused mid-flight: while non-zero, its calls that could change
    #: what they rely on (IOMMU, memory, grant and IOREQ-server calls) are -EBUSY.
    busy_ops: int = 0
    #: Emulators' foreign ops of many pages paused mid-flight on its frames: while non-zero,
    #: it cannot balloon or populate (-EBUSY), so the frames they checked stay its own.
    p2m_readers: int = 0
    #: The secret a connection presents to speak for this domain.
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def is_hvm(self) -> bool:
        return self.kind == "hvm"

    def privileged_over(self, other: Domain) -> bool:
        if other.domid == self.domid:
            return False
        return self.is_hwdom or self.target == other.domid
