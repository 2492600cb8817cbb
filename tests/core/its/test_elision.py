"""The elision policies: which INV, INVALL and SYNC reach the pITS (elision.py)."""

from __future__ import annotations

import pytest

from tests.core.its.guest import ITT_GFN, LPI, Guest, bring_up, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.core.its import ItsHost


def physical(its: ItsHost) -> dict[str, int]:
    return dict(its.pits[0].physical)


@pytest.mark.parametrize(
    ("policy", "invalls", "invs", "syncs"), [("lazy", 1, 0, 1), ("eager", 0, 8, 1), ("off", 2, 0, 2)]
)
def test_elision_policies(policy: str, invalls: int, invs: int, syncs: int) -> None:
    host, its = its_host(policy)
    g = Guest(its, host)
    bring_up(g)
    settle(its)
    before = physical(its)
    for e in range(8):
        g.enable(LPI + 32 + e)
    g.queue(c.invall(0))  # "enable them all, then INVALL"
    g.queue(c.invall(0))  # nothing dirty any more
    g.queue(c.sync(1), c.sync(1))  # SYNC; SYNC
    settle(its)
    after = physical(its)
    got = {k: after.get(k, 0) - before.get(k, 0) for k in ("INVALL", "INV", "SYNC")}
    assert got == {"INVALL": invalls, "INV": invs, "SYNC": syncs}
    assert g.creadr() == g.offset


def test_enable_1000_lpis_then_invall_sends_one_invall() -> None:
    host, its = its_host("lazy", slots=4096, batch=64)
    g = Guest(its, host, events=1024)
    g.queue(c.mapc(0, 0), c.mapd(0, 9, ITT_GFN << 12))
    for start in range(0, 1000, 100):
        g.queue(*[c.mapti(0, e, LPI + 32 + e, 0) for e in range(start, start + 100)])
        settle(its)
    before = dict(its.pits[0].physical)
    for e in range(1000):
        g.enable(LPI + 32 + e)
    g.queue(c.invall(0), c.sync(0))
    settle(its)
    after = dict(its.pits[0].physical)
    assert after.get("INVALL", 0) - before.get("INVALL", 0) == 1
    assert after.get("INV", 0) == before.get("INV", 0)
    assert all(its.pits[0].hw.cache[ite.plpi] & 1 for ite in g.vits().ites.values())
