"""Every guest-driven allocation is bounded (issue item 3, the shell): per-connection event
queues, and what replies and log lines repeat of what a peer sent.

A connection whose peer never reads cannot make the daemon hold more than
``--max-queued-events`` distinct events for it: an LPI that fires again before it was sent
is one event (as a GIC's pending bit is one bit), and past the bound the connection is cut.
To make the daemon queue at all, the attacker first blocks its own connection: it asks for
big replies and never reads them, so the daemon's sender is stuck behind the socket.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.shell_kit import Raw, attacked, connections, log_events, stall, wait_for
from tests.conformance.beds import DaemonProcess
from tests.wire.test_vits_wire import ITT_GFN, LPI, PROP_GFN, QUEUE_GFN
from xenemu.abi import its_cmd as c
from xenemu.client import SyncControlClient, SyncHypercallClient

EVENTS = 8
BIG_ECHO = {"id": 1, "op": "echo", "args": {"buf": b"\x55" * (1 << 20), "count": 0}}


class LpiGuest:
    """A guest with a vITS and a device of ``EVENTS`` MSIs, all mapped and enabled."""

    def __init__(self, ctl: SyncControlClient, daemon: DaemonProcess) -> None:
        reply = ctl.create_domain("hvm", 64, vcpus=2)
        self.domid, self.token = reply["domid"], reply["token"]
        vdev = ctl.assign_device(self.domid, "00:03.0", its_devid=0x40, its_events=EVENTS)["vdevid"]
        self.doorbell = ctl.its_info(self.domid)["its_frames"]["0"] + 0x10040
        xc = self.xc = SyncHypercallClient.connect(daemon.hypercall_path, self.token)
        xc.its_mmio("its", 0, 0x80, 8, 1 << 63 | QUEUE_GFN << 12)
        xc.its_mmio("its", 0, 0x100, 8, 1 << 63)
        xc.its_mmio("its", 0, 0x108, 8, 1 << 63)
        for vcpu in range(2):
            xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN << 12 | 15)
            xc.its_mmio("redist", vcpu, 0x0, 4, 1)
        xc.its_mmio("its", 0, 0x0, 4, 1)
        commands = [c.mapc(0, 0), c.mapc(1, 1), c.invall(0), c.sync(0), c.mapd(vdev, 2, ITT_GFN << 12)]
        commands += [x for e in range(EVENTS) for x in (c.mapti(vdev, e, self.intid(e), e % 2), c.sync(e % 2))]
        for i, command in enumerate(commands):
            xc.guest_write(QUEUE_GFN, command.encode(), i * 32)
        xc.guest_write(PROP_GFN, bytes([0xA3] * EVENTS), 64)
        xc.its_mmio("its", 0, 0x88, 8, len(commands) * 32)
        wait_for(lambda: xc.its_mmio("its", 0, 0x90, 8) == len(commands) * 32, message="the queue stalled")

    @staticmethod
    def intid(event: int) -> int:
        return LPI + 64 + event

    def fire(self, event: int) -> dict[str, Any] | None:
        """The device raises ``event``; the guest takes the LPI on this connection and ends it."""
        assert self.xc.device_dma("00:03.0", self.doorbell, event.to_bytes(4, "little"))["ok"]
        got = self.xc.next_event(timeout=10)
        assert got == {"event": "lpi", "vcpu": event % 2, "intid": self.intid(event)}
        self.xc.its_end(event % 2, self.intid(event))
        return got


def blocked_connection(daemon: DaemonProcess, token: str) -> Raw:
    """A connection of the guest's that asks for big replies and never reads them."""
    raw = Raw(daemon.hypercall_path)
    assert (raw.hello(token) or {}).get("ret") == 0
    assert stall(raw, BIG_ECHO, limit=64) >= 1
    return raw


def queued_of(ctl: SyncControlClient, domid: int) -> list[int]:
    return [row["queued_events"] for row in connections(ctl)["connections"] if row["domid"] == domid]


def test_an_lpi_that_fires_again_before_it_was_sent_is_one_event(tmp_path: Path) -> None:
    with attacked(tmp_path, "--send-timeout", "600") as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        guest = LpiGuest(ctl, daemon)
        victim = blocked_connection(daemon, guest.token)
        for _ in range(300):  # the same LPI, 300 times, while the blocked connection takes nothing
            guest.fire(0)
        assert sorted(queued_of(ctl, guest.domid)) == [0, 1]  # the reading connection, the blocked one
        assert not log_events(daemon, "closed")
        # once it reads, the blocked connection gets its replies, then the LPI: nothing lost
        victim.sock.settimeout(5)
        seen = []
        while (message := victim.recv()) is not None and len(seen) < 64 + 1:
            seen.append(message)
            if message.get("event") == "lpi":
                break
        assert seen[-1] == {"event": "lpi", "vcpu": 0, "intid": guest.intid(0)}
        assert ctl.audit() == []


def test_a_connection_with_more_distinct_events_waiting_than_the_bound_is_cut(tmp_path: Path) -> None:
    flags = ("--send-timeout", "600", "--max-queued-events", "4")
    with attacked(tmp_path, *flags) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        guest = LpiGuest(ctl, daemon)
        blocked = blocked_connection(daemon, guest.token)
        for event in range(EVENTS):  # 8 distinct LPIs: the 5th does not fit
            guest.fire(event)
        closed = wait_for(lambda: log_events(daemon, "closed"))
        assert "event queue full (4 events" in closed[0]["reason"]
        wait_for(lambda: len(queued_of(ctl, guest.domid)) == 1, message="the blocked connection is still there")
        guest.fire(1)  # the guest's reading connection is unaffected
        blocked.sock.settimeout(5)
        while blocked.recv() is not None:  # what was sent before the cut, then the end
            pass
        assert ctl.audit() == []


BIG = "A" * 4000  # as long as a string may be after hello
ECHOES = {
    "op-string": {"id": 1, "op": BIG, "args": {}},
    "op-bytes": {"id": 1, "op": b"\xff" * 1_000_000, "args": {}},
    "op-list": {"id": 1, "op": list(range(100_000)), "args": {}},
    "unknown-argument-names": {"id": 1, "op": "domain_info", "args": {f"{i}{BIG}": 0 for i in range(60)}},
    "string-past-the-decoder": {"id": 1, "op": "B" * 3_000_000, "args": {}},
    "name-echoed-by-the-core": {"id": 1, "op": "device_dma", "args": {"bdf": BIG, "addr": 0, "length": 1}},
}


@pytest.mark.parametrize("case", list(ECHOES))
def test_replies_and_log_lines_repeat_at_most_a_little_of_what_a_peer_sent(tmp_path: Path, case: str) -> None:
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        token = ctl.create_domain("hvm", 16)["token"]
        raw = Raw(daemon.hypercall_path)
        assert (raw.hello(token) or {}).get("ret") == 0
        logged = len(daemon.log_text())
        for _ in range(5):
            raw.send(ECHOES[case])
            reply = raw.recv()
            assert reply is not None and reply["ret"] < 0
            assert len(reply.get("message", "")) <= 200, len(reply["message"])
        assert ctl.audit() == []
        wait_for(lambda: len(daemon.log_text()) > logged)
        assert len(daemon.log_text()) - logged < 5 * 1024  # five refusals, a line each


def test_a_hello_refusal_repeats_at_most_a_little_of_the_version(tmp_path: Path) -> None:
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        raw = Raw(daemon.hypercall_path)
        raw.send({"id": 1, "op": "hello", "args": {"version": "V" * 250}})
        reply = raw.recv()
        assert reply is not None and reply["ret"] == -93 and len(reply["message"]) <= 200
        assert all(len(str(e.get("reason", ""))) <= 200 for e in log_events(daemon, "refused"))
        assert ctl.audit() == []


def test_the_log_lines_a_peer_causes_are_rated(tmp_path: Path) -> None:
    """A guest pipelining bad requests wrote a warning per request (1.7 MB of log a second);
    now each peer has a budget of lines (20 at once, 10 a second), and the next line let
    through says how many were dropped.  Counted against the time the attack took."""
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        token = ctl.create_domain("hvm", 16)["token"]
        raw = Raw(daemon.hypercall_path)
        assert (raw.hello(token) or {}).get("ret") == 0
        started = time.monotonic()
        for chunk in range(20):  # pipelined, a hundred at a time (so the replies are read)
            for i in range(100):
                raw.send({"id": chunk * 100 + i, "op": "no_such_request", "args": {}})
            for _ in range(100):
                reply = raw.recv()
                assert reply is not None and reply["ret"] == -95  # each still answered
        elapsed = time.monotonic() - started
        wait_for(lambda: log_events(daemon, "refused"))
        refused = log_events(daemon, "refused")
        assert len(refused) <= 20 + 10 * elapsed + 2, (len(refused), elapsed)
        time.sleep(0.2)  # the budget refills
        raw.send({"id": 1, "op": "no_such_request", "args": {}})
        assert (raw.recv() or {}).get("ret") == -95
        wait_for(lambda: any(e.get("dropped_before") for e in log_events(daemon, "refused")))
        assert ctl.audit() == []
