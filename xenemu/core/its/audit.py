"""The ITS invariants (the end of vits-semantics.md), recomputed from the state after a request.

- Every slot between a pITS's ``CREADR`` and ``CWRITER`` is owned by exactly one ``vits_cq`` or by
  Xen; the slots a ``vits_cq`` owns are exactly its commands in flight (a queue replaced by a
  CBASER write included), and they are one batch; ``creadr <= progress <= cwriter`` in ring
  order; at most one Xen completion ``INT`` is outstanding per pITS.
- Each mapped ``(device, event)`` has exactly one physical LPI, bound to exactly one vLPI of the
  device's domain, and the vLPI index agrees with the bindings.
- Pending state exists only on a live mapping (it is a field of the ITE), and only while the vCPU
  it is on has that LPI in service (else it would have been delivered); a mapping waiting for its
  physical MAPTI names a slot that waits for it.
- What Xen owes a vITS (jobs.py) concerns only mappings it has now (at most one command of
  each kind per mapping, by construction), and its pITS's passes know it is owed.
- Once every command on a pITS has completed, its cache equals the physical configuration
  table for every LPI it caches whose dirty bit is clear.

It only reads, and it sits above the facade (it takes an ``ItsHost``, as the host's audit and the
tests hold one) so that nothing in the ITS depends on it.
"""

from __future__ import annotations

from xenemu.abi import its_cmd as cmds
from xenemu.core.its.facade import ItsHost
from xenemu.core.its.state import LPI_BASE, XEN_DEVID


def audit_its(its: ItsHost) -> list[str]:
    """The invariants at the end of vits-semantics.md."""
    problems: list[str] = []
    for state in its.pits:
        hw = state.hw
        slot = state.last_creadr  # slots the hardware ran since the last pass are still owned
        owned = 0
        while slot != hw.cwriter:
            if slot not in state.owner:
                problems.append(f"pITS {hw.index}: slot {slot} between CREADR and CWRITER has no owner")
            owned += 1
            slot = (slot + 1) % hw.slots
        if len(state.owner) != owned:
            problems.append(f"pITS {hw.index}: {len(state.owner)} slots owned, {owned} in use")
        xen_ints = sum(
            1
            for s, o in state.owner.items()
            if o is None and (placed := hw.ring[s]) is not None and placed.cmd == cmds.INT and placed.devid == XEN_DEVID
        )
        if xen_ints > 1:
            problems.append(f"pITS {hw.index}: {xen_ints} Xen completion INTs outstanding")
        if not hw.queued():
            for lpi, cached in hw.cache.items():
                if lpi not in its.dirty and cached != its.prop[lpi - LPI_BASE]:
                    problems.append(f"pITS {hw.index}: idle, yet LPI {lpi} cached {cached:#x} is not the table's")
    seen: dict[int, tuple[int, int, tuple[int, int]]] = {}
    for domid, dom in its.domains.items():
        if any(not 0 <= vcpu < dom.vcpus for vcpu, _ in dom.in_service):
            problems.append(f"d{domid}: an LPI in service on a vCPU it does not have")
        for pits, vits in dom.vits.items():
            size = vits.queue_bytes
            if size:
                ring = ((vits.progress - vits.creadr) % size, (vits.cwriter - vits.creadr) % size)
                if ring[0] > ring[1]:
                    problems.append(f"d{domid} vITS {pits}: creadr <= progress <= cwriter broken")
            in_flight = {t.slot for t in vits.in_flight()}
            owners = {s for s, o in its.pits[pits].owner.items() if o is vits}
            if not in_flight <= owners:
                problems.append(f"d{domid} vITS {pits}: commands in flight on slots it does not own")
            if not owners <= in_flight:
                problems.append(f"d{domid} vITS {pits}: slots it owns hold commands not in flight for it")
            if len({t.batch for t in vits.in_flight()}) > 1:
                problems.append(f"d{domid} vITS {pits}: more than one batch in flight")
            live = {id(ite) for ite in vits.ites.values()}
            if any(id(ite) not in live for ite in vits.moves) or any(id(ite) not in live for ite, _ in vits.owed):
                problems.append(f"d{domid} vITS {pits}: Xen owes commands for a mapping it no longer has")
            if (vits.owed or vits.moves) and vits not in its.pits[pits].owing:
                problems.append(f"d{domid} vITS {pits}: owed commands that no pass will place")
            for key, ite in vits.ites.items():
                if ite.pending is not None and (ite.pending, ite.vlpi) not in dom.in_service:
                    problems.append(f"d{domid}: {key} pending on vCPU {ite.pending} that has it not in service")
                if ite.mapti_slot is not None and its.pits[pits].mapti_slots.get(ite.mapti_slot) is not ite:
                    problems.append(f"d{domid}: {key} waits on a MAPTI slot that is not its own")
                if ite.plpi in seen:
                    problems.append(f"d{domid}: physical LPI {ite.plpi} bound twice")
                seen[ite.plpi] = (domid, pits, key)
                if its.bindings.get(ite.plpi) != (domid, pits, key):
                    problems.append(f"d{domid}: mapping {key} not bound to its physical LPI {ite.plpi}")
    for plpi in its.bindings:
        if plpi not in seen:
            problems.append(f"physical LPI {plpi} bound to no mapping")
    indexed = {(d, v): set(p) for (d, v), p in its.by_vlpi.items()}
    expected: dict[tuple[int, int], set[int]] = {}
    for plpi, (domid, pits, key) in seen.items():
        expected.setdefault((domid, its.domains[domid].vits[pits].ites[key].vlpi), set()).add(plpi)
    if indexed != expected:
        problems.append("the vLPI index disagrees with the bindings")
    return problems
