"""Draft C's scheduling: round-robin batches, one in flight per queue, no starvation (schedule.py)."""

from __future__ import annotations

from tests.core.its.guest import BASER, Guest, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.core.host import Host
from xenemu.core.its import ItsHost, audit_its
from xenemu.core.its.schedule import MAX_ROUNDS


def test_round_robin_and_one_batch_in_flight(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    flood = Guest(its, host, devid=0x10)
    victim = Guest(its, host, devid=0x11)
    settle(its)  # Xen's own MAPDs for the two devices
    flood.queue(*[c.sync(i % 2) for i in range(100)])  # alternating targets: nothing to elide
    state = its.pits[0]
    assert flood.vits().batch_in_flight() and state.hw.queued() == 4 + 1  # a batch, and Xen's INT
    victim.queue(c.mapc(0, 0), c.sync(0))
    # the flooder has a batch on the pITS, so the victim is served in the same round
    assert victim.vits().batch_in_flight()
    owners = {id(o) for o in state.owner.values() if o is not None}
    assert owners == {id(flood.vits()), id(victim.vits())}
    # exactly one Xen completion INT outstanding while commands are on the pITS
    assert sum(1 for slot, o in state.owner.items() if o is None) == 1
    state.hw.step(state.hw.queued())
    its.deliver()
    its.run_passes()
    assert victim.creadr() == victim.offset  # the victim finished within one round
    assert flood.creadr() < flood.offset
    settle(its)
    assert flood.creadr() == flood.offset and not state.xen_int_outstanding and state.hw.queued() == 0


def test_victim_completes_within_one_round_while_another_keeps_32767_queued() -> None:
    host, its = its_host("off", slots=32768, batch=8)
    flood_dom = host.create_domain("hvm", 300, vcpus=2)
    its.assign(flood_dom.domid, 0x30, 0, 8, 0)
    big_queue = 1 << 63 | 16 << 12 | 255  # 256 pages: 32,768 slots
    for reg, value in ((0x80, big_queue), (0x100, BASER), (0x108, BASER)):
        its.mmio_write(flood_dom.domid, 0, reg, 8, value)
    its.mmio_write(flood_dom.domid, 0, 0x0, 4, 1)
    sync = c.sync(0).encode()
    for i in range(32767):
        host.memory.access(flood_dom.domid, 16 + i * 32 // 4096, i * 32 % 4096, sync)
    its.mmio_write(flood_dom.domid, 0, 0x88, 8, 32767 * 32)
    its.run_passes()
    victim = Guest(its, host, devid=0x11)
    state = its.pits[0]
    settle_rounds = 0
    victim.queue(c.mapc(0, 0), c.sync(0))
    while victim.creadr() != victim.offset:
        state.hw.step(state.hw.queued())
        its.deliver()
        its.run_passes()
        settle_rounds += 1
        assert settle_rounds <= 2  # its batch goes on in the next pass, completes with that round
    flood_vits = its.domains[flood_dom.domid].vits[0]
    assert flood_vits.creadr < 32767 * 32  # the flooder still has thousands waiting
    assert not audit_its(its)


def test_round_robin_resumes_after_the_last_queue_served() -> None:
    host, its = its_host("off", slots=10, batch=4)  # room for two batches and Xen's INT
    guests = [Guest(its, host, devid=0x10 + i) for i in range(3)]
    settle(its)
    state = its.pits[0]
    for g in guests:
        g.queue(*[c.sync(i % 2) for i in range(12)])

    def served() -> list[int]:
        owners = [o for _, o in sorted(state.owner.items()) if o is not None]
        return sorted({next(i for i, g in enumerate(guests) if g.vits() is o) for o in owners})

    rounds = [served()]
    for _ in range(3):
        state.hw.step(state.hw.queued())
        its.deliver()
        its.run_passes()
        rounds.append(served())
    assert rounds == [[0, 1], [0, 2], [1, 2], [0, 1]]  # each pass starts after the last one served
    assert all(len([s for s, o in state.owner.items() if o is g.vits()]) <= 4 for g in guests)  # batch limit


def test_rewriting_cbaser_with_a_batch_in_flight_gives_no_second_batch(setup: tuple[Host, ItsHost]) -> None:
    """The old queue's batch still on the pITS completes without moving CREADR; until it has,
    the queue gets no other batch (one batch in flight per vits_cq)."""
    host, its = setup
    g = Guest(its, host)
    g.queue(*[c.sync(i % 2) for i in range(3)])
    state = its.pits[0]
    old = {s for s, o in state.owner.items() if o is g.vits()}
    assert old and g.vits().batch_in_flight()
    its.mmio_write(g.domid, 0, 0x0, 4, 0)
    its.mmio_write(g.domid, 0, 0x80, 8, 1 << 63 | 16 << 12)  # the queue again: CREADR and CWRITER reset
    its.mmio_write(g.domid, 0, 0x0, 4, 1)
    assert its.mmio_read(g.domid, 0, 0x90, 8) == 0 and g.vits().batch_in_flight()
    for i in range(2):
        host.memory.access(g.domid, 16, i * 32, c.sync(i).encode())
    its.mmio_write(g.domid, 0, 0x88, 8, 64)
    its.run_passes()
    assert not audit_its(its)
    assert {s for s, o in state.owner.items() if o is g.vits()} == old  # still only the old batch
    settle(its)
    assert its.mmio_read(g.domid, 0, 0x90, 8) == 64  # the new queue's two, not the old three


def test_the_audit_sees_a_second_batch_in_flight(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    g.queue(*[c.sync(i % 2) for i in range(3)])
    vits = g.vits()
    vits.orphans, vits.taken = [], type(vits.taken)()  # forget the batch, as CBASER writes did
    assert any("not in flight for it" in p for p in audit_its(its))


def test_a_request_runs_a_bounded_number_of_rounds(setup: tuple[Host, ItsHost]) -> None:
    """Batches that place nothing (here: MAPCs, recorded) raise a pass each; one request runs
    MAX_ROUNDS rounds of them and leaves the rest raised, for the shell to run next."""
    host, its = setup
    g = Guest(its, host)
    g.queue(*[c.mapc(0, i % 2) for i in range(100)])
    taken = g.vits().progress // 32
    assert taken == MAX_ROUNDS * 4 and its.raised == {0}  # batches of four
    its.run_passes()
    assert g.vits().progress // 32 == 2 * taken
    settle(its)
    assert g.creadr() == g.offset and not its.raised


def test_a_creadr_read_keeps_the_pass_its_own_pass_raises(setup: tuple[Host, ItsHost]) -> None:
    """The read's pass stands for passes raised before it; if its batch placed nothing, the
    pass that raises is another one, run at the end of the request."""
    host, its = setup
    g = Guest(its, host)
    for i in range(40):
        host.memory.access(g.domid, 16, i * 32, c.mapc(0, i % 2).encode())  # recorded: places nothing
    its.mmio_write(g.domid, 0, 0x88, 8, 40 * 32)  # raises a pass (not run: same request)
    assert its.raised == {0}
    its.mmio_read(g.domid, 0, 0x90, 8)  # runs it now: one batch of four, nothing placed
    assert g.vits().progress == 4 * 32 and its.raised == {0}
