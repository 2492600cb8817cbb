"""Live migration: pre-copy rounds under log-dirty mode, then a short stop-and-copy.

The source sends a domain's memory while it runs, in *sections* of at most ``SECTION_PAGES``
pages; every write made meanwhile is logged, so a page written after it was copied is sent again
in the next round. Two logs feed a round, and both are read and cleared when it begins:

* the p2m's log (``P2M.log``): the guest's CPU writes (``guest_write``) and every populate and
  depopulate of a GFN;
* the IOMMU entries' dirty bits (``IommuContext.dirty``, as iommufd's dirty tracking): device
  DMA writes, through the domain's own context or an emulator's foreign mapping of its frames.

When a round is small enough (the toolstack decides: ``xenemu migrate``), the domain is stopped
(``Host.suspended``: its calls, requests naming it and DMA to its frames are ``-EBUSY``), and its
last section is a save image (``save.snapshot``) whose DATA holds only the pages dirtied since the
pre-copy sections. The receiver builds the domain as sections arrive: created at the first one
(hidden behind ``busy_ops`` and ``Host.suspended``), its GFNs populated and written section by
section, and completed by the last one with everything ``restore`` puts back; it then takes the
source domain's token, so the guest reconnects to its new host without a new secret. The source
destroys its copy once the receiver has it (``finish``); before that, the migration may be
abandoned and the domain runs on where it was.

Sections are the save format (``image.py``): header, typed records, SHA-256 trailer. A pre-copy
section has header flags ``PRECOPY`` and records META (JSON), SENT (u64 GFNs whose pages it sends;
a sent GFN without a DATA page is a zero page), GONE (u64 GFNs no longer populated) and DATA; the
last has flags ``FINAL`` and is a save image with META's ``live`` field.
"""

from __future__ import annotations

from xenemu.core.migration.incoming import drop_incoming, receive, resume
from xenemu.core.migration.outgoing import abandon, begin, commit, finish, read_dirty, send, suspend
from xenemu.core.migration.stream import (
    COPY_SLICE,
    LOG_SLACK,
    MAX_MIGRATIONS,
    PRECOPY,
    SECTION_PAGES,
    Migrations,
    encode_precopy,
)

__all__ = [
    "COPY_SLICE",
    "LOG_SLACK",
    "MAX_MIGRATIONS",
    "PRECOPY",
    "SECTION_PAGES",
    "Migrations",
    "abandon",
    "begin",
    "commit",
    "drop_incoming",
    "encode_precopy",
    "finish",
    "read_dirty",
    "receive",
    "resume",
    "send",
    "suspend",
]
