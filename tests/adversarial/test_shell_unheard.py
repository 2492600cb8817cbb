"""LPIs kept for a domain's next connection (PROTOCOL.md 3, events): bounded per domain, and tied
to the domain instance, so a guest that fires while unconnected cannot grow the daemon and a
later domain given the same id inherits nothing."""

from __future__ import annotations

from xenemu.core.memory.domain import Domain
from xenemu.server.session import Unheard


def test_kept_lpis_are_bounded_and_belong_to_their_domain_instance() -> None:
    unheard = Unheard(limit=1024)
    first = Domain(domid=7, kind="hvm")
    unheard.hold(first, [(v, 8192 + i) for v in range(4) for i in range(4096)])
    assert len(unheard.held[7][1]) == 1024  # not 16,384
    later = Domain(domid=7, kind="hvm")  # the id given again, to another domain
    unheard.hold(later, [(0, 8200)])
    assert unheard.held[7] == (later, {(0, 8200): None})
    unheard.forget(7)
    assert not unheard.held
