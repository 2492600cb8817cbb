"""Two guests' ITS streams as a hypothesis state machine: commands (MOVI, CLEAR, DISCARD and the
rest), MSIs, pending-table loads and configuration writes interleave with the pITS executing a
few commands at a time, with deliveries and with the guests' ends.

What a guest must see, checked after every step: the audit is clean; an LPI is never delivered
to a vCPU that still has it in service (once per time it became pending); a guest only gets its
own vLPIs. ``quiesce`` is the strong check of pending state: after a guest CLEARs every mapping
and ends everything it was given, nothing more may come, from any mapping, old or new.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.core.its.guest import ITT_GFN, LPI, Guest, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.its import audit_its

PEND_GFN = 40
EVENTS = 6
VLPIS = st.integers(LPI + 32, LPI + 40)

commands = st.one_of(
    st.builds(lambda e, v, i: c.mapti(0, e, v, i), st.integers(0, EVENTS), VLPIS, st.integers(0, 2)),
    st.builds(
        lambda k, e, i: c.event_cmd(k, 0, e, i),
        st.sampled_from([c.MOVI, c.CLEAR, c.DISCARD, c.INT, c.INV, c.MOVI, c.CLEAR, c.DISCARD]),
        st.integers(0, EVENTS),
        st.integers(0, 2),
    ),
    st.builds(lambda s, v: c.mapd(0, s, ITT_GFN << 12, v), st.sampled_from([2, 4, 16]), st.booleans()),
    st.builds(c.mapc, st.integers(0, 2), st.integers(0, 1), st.booleans()),
    st.builds(c.movall, st.integers(0, 1), st.integers(0, 1)),
    st.builds(c.invall, st.integers(0, 2)),
    st.builds(c.sync, st.integers(0, 1)),
)


class ItsStreams(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["lazy", "eager", "off"]))
    def start(self, policy: str) -> None:
        self.host, self.its = its_host(policy, slots=16, batch=3)
        self.guests = [Guest(self.its, self.host, devid=0x10 + i) for i in range(2)]
        self.seen = 0
        self.in_service: set[tuple[int, int, int]] = set()
        for g in self.guests:
            for vlpi in range(LPI + 32, LPI + 41):
                g.enable(vlpi)
            g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12))
            g.queue(*[c.mapti(0, e, LPI + 32 + e, e % 2) for e in range(EVENTS)])
        settle(self.its)

    def _queue(self, g: Guest, *blocks: ItsCommand) -> None:
        if g.vits().outstanding() + len(blocks) > 100:  # a one-page queue: make room first
            settle(self.its)
        g.queue(*blocks)

    @rule(who=st.integers(0, 1), stream=st.lists(commands, min_size=1, max_size=6))
    def command(self, who: int, stream: list[ItsCommand]) -> None:
        self._queue(self.guests[who], *stream)

    @rule(who=st.integers(0, 1), events=st.lists(st.integers(0, EVENTS), min_size=1, max_size=4))
    def msi(self, who: int, events: list[int]) -> None:
        for event in events:
            self.its.pits[0].hw.msi(0x10 + who, event)
            self.its.deliver()

    @rule(count=st.integers(1, 5))
    def hardware(self, count: int) -> None:
        """The pITS executes a few commands; Xen takes its interrupts and runs its passes."""
        self.its.pits[0].hw.step(count)
        self.its.deliver()
        self.its.run_passes()

    @rule()
    def drain(self) -> None:
        settle(self.its)

    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        if self.in_service:
            domid, vcpu, vlpi = data.draw(st.sampled_from(sorted(self.in_service)))
            self.in_service.discard((domid, vcpu, vlpi))
            self.its.end(domid, vcpu, vlpi)

    @rule(who=st.integers(0, 1), vlpi=VLPIS, on=st.booleans())
    def configure(self, who: int, vlpi: int, on: bool) -> None:
        self.guests[who].enable(vlpi, on)
        self.its.run_passes()  # as at the end of the guest's request

    @rule(who=st.integers(0, 1), vcpu=st.integers(0, 1), bits=st.sets(VLPIS), ptz=st.booleans())
    def pending_table(self, who: int, vcpu: int, bits: set[int], ptz: bool) -> None:
        """EnableLPIs 0 -> 1 with a pending table (set bits for ``bits``, clear for the rest)."""
        g = self.guests[who]
        table = bytearray(4096)
        for vlpi in bits:
            table[vlpi // 8] |= 1 << vlpi % 8
        self.host.memory.access(g.domid, PEND_GFN + vcpu, 0, bytes(table))
        self.its.redist_write(g.domid, vcpu, 0x0, 4, 0)
        self.its.redist_write(g.domid, vcpu, 0x78, 8, (PEND_GFN + vcpu) << 12 | ptz << 62)
        self.its.redist_write(g.domid, vcpu, 0x0, 4, 1)
        self.its.run_passes()

    @rule(who=st.integers(0, 1))
    def quiesce(self, who: int) -> None:
        """CLEAR every mapping, let it all complete, end everything: then nothing more comes."""
        g = self.guests[who]
        vits = g.vits()
        settle(self.its)
        self._queue(g, *[c.event_cmd(c.CLEAR, 0, event) for _, event in sorted(vits.ites)], c.sync(0))
        settle(self.its)
        self._check_deliveries()
        for domid, vcpu, vlpi in sorted(self.in_service):
            if domid == g.domid:
                self.in_service.discard((domid, vcpu, vlpi))
                assert self.its.end(domid, vcpu, vlpi) is None, "pending state survived CLEAR"
        settle(self.its)
        self._check_deliveries()
        assert not any(d == g.domid for d, _, _ in self.in_service), "delivered after CLEAR and end"

    def _check_deliveries(self) -> None:
        for d in self.its.deliveries[self.seen :]:
            key = (d.domid, d.vcpu, d.intid)
            assert key not in self.in_service, f"{key} delivered while in service"
            assert d.domid in {g.domid for g in self.guests}
            self.in_service.add(key)
        self.seen = len(self.its.deliveries)

    @invariant()
    def what_the_guests_see(self) -> None:
        if hasattr(self, "its"):
            self._check_deliveries()
            problems = audit_its(self.its)
            assert not problems, problems


def test_its_streams() -> None:
    run_state_machine_as_test(ItsStreams, settings=settings(max_examples=80, stateful_step_count=50, deadline=None))
