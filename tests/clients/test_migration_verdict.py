"""The migration scenario's verdict fails for what it promises to catch: a byte that the guest
was told was written but is not on the receiver (or one it was not told of that is), an
acknowledged MSI never delivered, one delivered twice, and an LPI with no MSI behind it. The
memory check reads a real daemon over its socket; the scenario's passing run is in
test_compose.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients"))

from migrating_guest import DATA_GFN, RECORD, SLOTS, record  # noqa: E402
from migration_verdict import lost_bytes, msi_check  # noqa: E402

from tests.conformance.beds import DaemonProcess  # noqa: E402
from xenemu.client import SyncControlClient, SyncHypercallClient  # noqa: E402


def guest_result(
    ledger: dict[int, int], msis: list[dict[str, Any]], unexpected: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "ledger": {str(k): v for k, v in ledger.items()},
        "data_gfn": DATA_GFN,
        "pages": 4,
        "msis": msis,
        "unexpected": unexpected,
        "lpis_in_service_across_the_move": 0,
    }


def test_lost_stale_and_unacknowledged_bytes_are_counted_on_a_real_daemon(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d", "--frames", "16384", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 8192, name="g")
        with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            good = {DATA_GFN * SLOTS + 0: 5, (DATA_GFN + 1) * SLOTS + 3: 9}
            for key, seq in good.items():
                gfn, slot = divmod(key, SLOTS)
                xc.guest_write(gfn, record(seq, gfn, slot), slot * RECORD)
            assert lost_bytes(xc, guest_result(good, [], [])) == (2, 0, [])
            # acknowledged but absent (lost), and an older write where a newer one was acknowledged
            lying = {**good, (DATA_GFN + 2) * SLOTS + 1: 11, DATA_GFN * SLOTS + 0: 6}
            slots, differing, examples = lost_bytes(xc, guest_result(lying, [], []))
            assert slots == 3 and differing > RECORD and len(examples) == 2
            assert "write 11 acknowledged, holds 0" in examples[1] and "write 6 acknowledged, holds 5" in examples[0]
            # a write the guest was told failed, which landed all the same
            xc.guest_write(DATA_GFN + 3, record(12, DATA_GFN + 3, 7), 7 * RECORD)
            assert lost_bytes(xc, guest_result(good, [], []))[1] > 0
    finally:
        daemon.stop()


def test_an_msi_lost_doubled_or_unasked_fails_and_none_at_all_proves_nothing() -> None:
    once = [{"event": e, "sent_on": "source", "taken": 1, "taken_on": "receiver"} for e in range(4)]
    figures, errors = msi_check(guest_result({}, once, []))
    assert errors == [] and figures["lost"] == figures["doubled"] == 0
    assert figures["sent_on_source_taken_on_receiver"] == 4
    lost = [*once, {"event": 5, "sent_on": "receiver", "taken": 0}]
    assert msi_check(guest_result({}, lost, []))[1] == [
        "1 acknowledged MSIs never delivered (first: event 5, sent on the receiver)"
    ]
    doubled = [*once, {"event": 6, "sent_on": "source", "taken": 2, "taken_on": "receiver"}]
    unasked = [{"intid": 8200, "vcpu": 1, "taken_on": "receiver"}]
    figures, errors = msi_check(guest_result({}, doubled, unasked))
    assert figures["doubled"] == 2 and len(errors) == 1
    assert "event 6 taken 2 times" in errors[0] and "INTID 8200 taken on the receiver" in errors[0]
    assert msi_check(guest_result({}, [], []))[1] == ["no MSI was acknowledged: the scenario proved nothing about LPIs"]
