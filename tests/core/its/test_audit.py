"""Random command streams from two guests drain, with the ITS invariants holding throughout (audit.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.its.guest import ITT_GFN, LPI, Guest, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand

command_strategy = st.one_of(
    st.binary(min_size=32, max_size=32),
    st.builds(lambda d, s, v: c.mapd(d, s, ITT_GFN << 12, v), st.integers(0, 2), st.integers(0, 4), st.booleans()),
    st.builds(c.mapc, st.integers(0, 3), st.integers(0, 2), st.booleans()),
    st.builds(c.mapti, st.integers(0, 1), st.integers(0, 9), st.integers(LPI - 1, LPI + 40), st.integers(0, 3)),
    st.builds(
        lambda k, d, e, i: c.event_cmd(k, d, e, i),
        st.sampled_from([c.INT, c.CLEAR, c.DISCARD, c.INV, c.MOVI]),
        st.integers(0, 1),
        st.integers(0, 9),
        st.integers(0, 3),
    ),
    st.builds(c.sync, st.integers(0, 2)),
    st.builds(c.invall, st.integers(0, 3)),
    st.builds(c.movall, st.integers(0, 2), st.integers(0, 2)),
)


@settings(max_examples=100, deadline=None)
@given(
    streams=st.lists(st.lists(command_strategy, max_size=40), min_size=2, max_size=2),
    policy=st.sampled_from(["lazy", "eager", "off"]),
    toggles=st.lists(st.tuples(st.integers(0, 1), st.integers(LPI, LPI + 40), st.booleans()), max_size=10),
    msis=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 9)), max_size=10),
)
def test_random_command_streams_drain_with_a_clean_audit(
    streams: list[list[ItsCommand | bytes]],
    policy: str,
    toggles: list[tuple[int, int, bool]],
    msis: list[tuple[int, int]],
) -> None:
    host, its = its_host(policy, slots=16, batch=3)
    guests = [Guest(its, host, devid=0x10 + i) for i in range(2)]
    for guest, stream in zip(guests, streams, strict=True):
        if stream:
            guest.queue(*stream)
    for who, vlpi, on in toggles:
        guests[who].enable(vlpi, on)
    deliveries = settle(its)
    for who, event in msis:
        its.pits[0].hw.msi(0x10 + who, event)
    deliveries += settle(its)
    for guest in guests:
        assert guest.creadr() == guest.offset % 4096  # every queue drained
    # an LPI goes only to the domain owning its current mapping
    owners = {g.domid: {ite.vlpi for ite in g.vits().ites.values()} for g in guests}
    for delivery in deliveries:
        assert delivery.intid in owners[delivery.domid]
