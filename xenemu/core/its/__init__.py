"""Virtual GICv3 ITSs (draft C): guests' command queues, translated and scheduled onto shared pITSs.

Pure and synchronous. A guest programs its vITS through trapped MMIO and a command queue in its
own RAM; ``CWRITER`` writes raise scheduling passes, which run at the end of the request. A pass
completes what the pITS finished, then refills it round-robin from the ``vits_cq``s on its
schedule list, one batch in flight per queue, translating each guest command at that moment. The
hardware runs on its own (``advance``); Xen's completion ``INT`` and guests' LPIs come out of
``deliver``. The shell only supplies time. Guest RAM is read only through ``GuestMemory``.

The rooms, in dependency order (each imports only rooms above it in this list):

``pits.py``
    The physical ITS model: a command ring run at its own rate, device table, ITTs,
    collections, per-CPU pending LPIs and the LPI configuration cache. Knows nothing of guests.
``state.py``
    The shared nouns: options, a domain's vITS state (``DomainIts``, with what each vCPU has in
    service), ``Vits`` and its ``vits_cq``, devices, ITEs (each with its LPI's pending state),
    redistributors, Xen's view of each pITS (``PitsState``), and ``ItsState`` holding them all
    with the physical configuration table, dirty bitmap and LPI bindings.
``assignment.py``
    Xen's physical resources, off the guest's command path: booting each pITS (Xen's
    collections and completion LPI), a domain's vITS state, a device's physical LPIs and ``MAPD``.
``lpis.py``
    LPIs reaching a guest: delivery from the pITSs, routing to a vCPU, dropping, coalescing
    while in service, moving a pending LPI with its mapping, and the guest's end of an LPI.
``elision.py``
    The trapped writes to a guest's LPI configuration table and the three elision policies
    (``lazy``, ``eager``, ``off``): whether an ``INV``, ``INVALL`` or ``SYNC`` is forwarded.
``translate.py``
    Translation and validation of each guest command into physical ones, with KVM's check
    order and drop names (``Dropped``).
``jobs.py``
    Xen's own work for a guest in slices of about a millisecond (``Budget``): the scans of a
    ``MAPC``/``MOVALL`` and the pending-table load of ``EnableLPIs``, and what they leave owed.
``teardown.py``
    A dying domain: its commands drain, then Xen's ``MAPD V=0``s and ``INVALL``s, then the free.
``schedule.py``
    Draft C's command-queue scheduling: triggers, the softirq, passes, round-robin batches,
    Xen's own queue and completion ``INT``, and ``CREADR`` advance.
``registers.py``
    What a guest sees: ``GITS_*`` and ``GICR_*`` registers, the pending table on ``EnableLPIs``
    (setting or clearing pending state), and the guest-physical layout of its frames and tables.
``facade.py``
    ``ItsHost``, composing the rooms over one ``ItsState``: the API the rest of the core uses.
``audit.py``
    ``audit_its``: the ITS invariants, recomputed from an ``ItsHost`` after a request.
"""

from xenemu.core.its.audit import audit_its
from xenemu.core.its.facade import ItsHost
from xenemu.core.its.registers import DOORBELL_MFN, DOORBELL_OFFSET, FRAME_SIZE
from xenemu.core.its.state import (
    Delivery,
    DomainIts,
    Elision,
    ItsDeviceInfo,
    ItsOptions,
    PitsState,
    Redistributor,
    Vits,
)

__all__ = [
    "DOORBELL_MFN",
    "DOORBELL_OFFSET",
    "FRAME_SIZE",
    "Delivery",
    "DomainIts",
    "Elision",
    "ItsDeviceInfo",
    "ItsHost",
    "ItsOptions",
    "PitsState",
    "Redistributor",
    "Vits",
    "audit_its",
]
