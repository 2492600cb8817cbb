"""Decoding cannot be amplified, and the handshake is exact (issue items 4 and 8, the wire).

Sizes and counts are checked before any per-element work: msgpack's limits on each header
(tight before hello, full after), then each list field's declared maximum before its elements.
A list too long with elements of the wrong type proves the order: -E2BIG, not -EINVAL.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.shell_kit import Raw, attacked
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient
from xenemu.core.actions.base import ACTIONS, _schema
from xenemu.wire import HEADER

E2BIG, EINVAL, EBADMSG, EMSGSIZE, EPROTONOSUPPORT, EACCES = -7, -22, -74, -90, -93, -13


def guest_raw(ctl: SyncControlClient, path: Path) -> Raw:
    token = ctl.create_domain("hvm", 16)["token"]
    raw = Raw(path)
    reply = raw.hello(token)
    assert reply is not None and reply["ret"] == 0
    return raw


def ask(raw: Raw, op: Any, args: Any) -> dict[str, Any]:
    raw.send({"id": 7, "op": op, "args": args})
    reply = raw.recv()
    assert reply is not None
    return reply


LISTS = {
    "gfns-of-none": ("populate_physmap", {"gfns": [None] * 65537}, E2BIG),
    "gfns-of-strings": ("decrease_reservation", {"gfns": ["x"] * 100_000}, E2BIG),
    "gfns-past-the-decoder": ("populate_physmap", {"gfns": [0] * (2 * 65536 + 1)}, EBADMSG),
    "pin-of-strings": ("create_domain", {"type": "hvm", "memory": 1, "pin": ["x"] * 65}, E2BIG),
    "rmrr-of-none": ("assign_device", {"domid": 1, "bdf": "00:09.0", "rmrr": [None] * 65}, E2BIG),
}


@pytest.mark.parametrize("case", list(LISTS))
def test_a_long_list_is_refused_before_its_elements_are_looked_at(tmp_path: Path, case: str) -> None:
    op, args, errno = LISTS[case]
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        if op in ("create_domain", "assign_device"):
            raw = Raw(daemon.control_path)
            assert (raw.hello(None) or {}).get("ret") == 0
        else:
            raw = guest_raw(ctl, daemon.hypercall_path)
        reply = ask(raw, op, args)
        assert reply["ret"] == errno, reply
        assert ask(raw, "domain_info" if op.endswith("physmap") or "reservation" in op else "stats", {})["ret"] == 0
        assert ctl.audit() == []


NESTED = {
    # Each within every per-container limit, yet millions of objects if decoded in full.
    "nested-empty-arrays": {"gfns": [[]] * 131072, "more": [[]] * 131072},
    "maps-in-a-list": {"gfns": [{}] * 131072},
    "many-full-lists": {"gfns": [[0] * 65536] * 3},
}


@pytest.mark.parametrize("case", list(NESTED))
def test_a_message_of_very_many_small_containers_is_refused_while_decoding(tmp_path: Path, case: str) -> None:
    """msgpack's limits are per container: the decoder also bounds the arrays and maps of one
    message and their elements in all, and stops as soon as a message is past either."""
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        raw = guest_raw(ctl, daemon.hypercall_path)
        reply = ask(raw, "populate_physmap", NESTED[case])
        assert reply["ret"] == EBADMSG, reply
        assert "arrays and maps" in reply["message"]
        assert ask(raw, "domain_info", {})["ret"] == 0
        assert ctl.audit() == []


def bare_lists(hint: Any, bounded: bool = False) -> int:
    """How many lists in a field's type are not directly bounded by a MaxLen."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(hint)
        return bare_lists(inner, any(type(m).__name__ == "MaxLen" for m in meta))
    here = int(origin is list and not bounded)
    return here + sum(bare_lists(arg) for arg in typing.get_args(hint) if origin is not typing.Literal)


def test_every_list_field_declares_its_maximum() -> None:
    lists = 0
    for cls in ACTIONS.values():
        _schema(cls)  # raises TypeError for a list field without MaxLen
        for name, hint in typing.get_type_hints(cls, include_extras=True).items():
            lists += "list" in str(hint)
            assert bare_lists(hint) == 0, f"{cls.__name__}.{name}: {hint}"
    assert lists >= 4  # gfns (twice), pin, rmrr


BEFORE_HELLO = {
    "frame-over-1-KiB": ({"id": 1, "op": "hello", "args": {"version": 1, "token": "0" * 2000}}, EMSGSIZE),
    "string-over-256": ({"id": 1, "op": "hello", "args": {"version": 1, "token": "0" * 300}}, EBADMSG),
    "map-over-16": ({"id": 1, "op": "hello", "args": {f"k{i}": i for i in range(20)}}, EBADMSG),
    "array-over-16": ({"id": 1, "op": "hello", "args": {"version": 1, "token": list(range(40))}}, EBADMSG),
}


@pytest.mark.parametrize("case", list(BEFORE_HELLO))
def test_before_hello_the_decoder_takes_only_a_hello(tmp_path: Path, case: str) -> None:
    message, errno = BEFORE_HELLO[case]
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        raw = Raw(daemon.hypercall_path)
        raw.send(message)
        reply = raw.recv()
        assert reply is not None and reply["ret"] == errno and reply["id"] is None, reply
        if errno == EMSGSIZE:
            assert raw.recv() is None  # the stream is no longer framed: closed
        # the same sizes are fine once the peer has said hello
        token = ctl.create_domain("hvm", 16)["token"]
        good = Raw(daemon.hypercall_path)
        assert (good.hello(token) or {}).get("ret") == 0
        assert ask(good, "echo", {"buf": b"\x00" * 2000, "count": 0})["ret"] == 0
        assert ask(good, "echo", {"buf": b"", "count": 0, "pad": "x" * 300})["ret"] == EINVAL  # unknown arg
        batch = bytes(ops.pack([ops.query_caps()] * 65536))
        assert ask(good, "iommu_op", {"buf": batch, "count": 65536})["ret"] == 0  # 2 MiB
        assert ctl.audit() == []


def test_a_header_claiming_a_huge_frame_before_hello_is_cut_at_once(tmp_path: Path) -> None:
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        raw = Raw(daemon.hypercall_path)
        raw.send_bytes(HEADER.pack(4 * 1024 * 1024) + b"\x80" * 100)
        reply = raw.recv()
        assert reply is not None and reply["ret"] == EMSGSIZE and raw.recv() is None
        assert ctl.audit() == []


@pytest.mark.parametrize("version", [True, 1.0], ids=["true", "float"])
def test_hello_version_is_the_integer_1_only(tmp_path: Path, version: Any) -> None:
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        token = ctl.create_domain("hvm", 16)["token"]
        for path, args in ((daemon.hypercall_path, {"version": version, "token": token}), (daemon.control_path, {})):
            raw = Raw(path)
            raw.send({"id": 1, "op": "hello", "args": {"version": version, **args}})
            reply = raw.recv()
            assert reply is not None and reply["ret"] == EPROTONOSUPPORT, reply
            assert raw.recv() is None
        assert ctl.audit() == []


@pytest.mark.parametrize("req_id", [True, False], ids=["true", "false"])
def test_a_request_id_is_an_unsigned_32_bit_integer_not_a_boolean(tmp_path: Path, req_id: Any) -> None:
    with attacked(tmp_path) as daemon, SyncControlClient.connect(daemon.control_path) as ctl:
        raw = guest_raw(ctl, daemon.hypercall_path)
        raw.send({"id": req_id, "op": "domain_info", "args": {}})
        reply = raw.recv()
        assert reply is not None and reply["ret"] == EINVAL and reply["id"] is None, reply
        assert ctl.audit() == []
