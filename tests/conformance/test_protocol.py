"""The wire protocol against a real daemon: handshake, identity, malformed input, fairness, shutdown."""

from __future__ import annotations

import json
import select
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.conformance.beds import DaemonProcess
from tests.conformance.conftest import BASE, Daemons, daemon_flags
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, SyncHypercallClient
from xenemu.wire import MAX_FRAME, FrameDecoder, encode


class Raw:
    """A bare socket speaking frames, so tests can send what no client library would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the daemon has closed the connection."""
        while True:
            message = self.decoder.next()
            if message is not None:
                assert isinstance(message, dict)
                return message
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)

    def pending(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def hello(self, token: str | None, version: int = 1) -> dict[str, Any] | None:
        args: dict[str, Any] = {"version": version}
        if token is not None:
            args["token"] = token
        self.send({"id": 1, "op": "hello", "args": args})
        return self.recv()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(daemons: Daemons) -> DaemonProcess:
    return daemons.get(dict(BASE))


@pytest.fixture
def guest(daemon: DaemonProcess) -> Iterator[tuple[int, str]]:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        reply = ctl.create_domain("hvm", 64)
        ctl.assign_device(reply["domid"], "00:07.0")
        yield reply["domid"], reply["token"]
        ctl.destroy_domain(reply["domid"])
        assert ctl.audit() == []


def still_serving(daemon: DaemonProcess, token: str) -> None:
    """After bad input: a good client is served and the audit is clean."""
    with SyncHypercallClient.connect(daemon.hypercall_path, token) as xc:
        (caps,) = xc.iommu_op([ops.query_caps()])
        assert caps.status == 0 and caps.flags & ops.MAP_CAP
    with SyncControlClient.connect(daemon.control_path) as ctl:
        assert ctl.audit() == []


# -- handshake and identity ------------------------------------------------------------------------------
def test_hello(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = Raw(daemon.hypercall_path)
    reply = raw.hello(guest[1])
    assert reply is not None
    assert reply["ret"] == 0 and reply["id"] == 1 and reply["domid"] == guest[0]
    assert reply["version"] == 1 and reply["max_frame"] == MAX_FRAME


@pytest.mark.parametrize("token", ["0" * 32, "", None, "x" * 200])
def test_bad_token_is_refused_and_closed(daemon: DaemonProcess, guest: tuple[int, str], token: str | None) -> None:
    raw = Raw(daemon.hypercall_path)
    reply = raw.hello(token)
    assert reply is not None and reply["ret"] == -13 and reply["error"] == "EACCES"
    assert raw.recv() is None
    assert "bad token" in daemon.log_text()
    still_serving(daemon, guest[1])


def test_a_hello_bigger_than_a_hello_is_refused_and_closed(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    """Before hello, a frame may hold at most 1,024 bytes (section 10)."""
    raw = Raw(daemon.hypercall_path)
    reply = raw.hello("x" * 10_000)
    assert reply is not None and reply["ret"] == -90 and reply["error"] == "EMSGSIZE"
    assert raw.recv() is None
    still_serving(daemon, guest[1])


def test_token_of_wrong_type(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = Raw(daemon.hypercall_path)
    raw.send({"id": 1, "op": "hello", "args": {"version": 1, "token": 12345}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -13
    still_serving(daemon, guest[1])


def test_unsupported_version(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = Raw(daemon.hypercall_path)
    reply = raw.hello(guest[1], version=2)
    assert reply is not None and reply["ret"] == -93
    assert raw.recv() is None


def test_request_before_hello(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = Raw(daemon.hypercall_path)
    raw.send({"id": 3, "op": "iommu_op", "args": {"buf": b"", "count": 0}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -71 and reply["id"] == 3
    assert raw.recv() is None
    still_serving(daemon, guest[1])


def test_second_hello(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = Raw(daemon.hypercall_path)
    raw.hello(guest[1])
    reply = raw.hello(guest[1])
    assert reply is not None and reply["ret"] == -71


def test_channels_are_separate(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    xc = Raw(daemon.hypercall_path)
    xc.hello(guest[1])
    xc.send({"id": 2, "op": "create_domain", "args": {"type": "hvm", "memory": 1}})
    reply = xc.recv()
    assert reply is not None and reply["ret"] == -1
    ctl = Raw(daemon.control_path)
    ctl.hello(None)
    ctl.send({"id": 2, "op": "iommu_op", "args": {"buf": b"", "count": 0}})
    reply = ctl.recv()
    assert reply is not None and reply["ret"] == -1


def test_control_socket_is_private(daemon: DaemonProcess) -> None:
    assert daemon.control_path.stat().st_mode & 0o777 == 0o600


def test_destroyed_domain_is_disconnected_and_its_token_dead(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        reply = ctl.create_domain("hvm", 8)
        raw = Raw(daemon.hypercall_path)
        assert (raw.hello(reply["token"]) or {})["ret"] == 0
        ctl.destroy_domain(reply["domid"])
        assert raw.recv() is None
        again = Raw(daemon.hypercall_path)
        assert (again.hello(reply["token"]) or {})["ret"] == -13


# -- malformed requests ------------------------------------------------------------------------------------
def session(daemon: DaemonProcess, token: str) -> Raw:
    raw = Raw(daemon.hypercall_path)
    assert (raw.hello(token) or {})["ret"] == 0
    return raw


@pytest.mark.parametrize(
    ("message", "ret"),
    [
        ({"id": 5, "op": "no_such_op", "args": {}}, -95),
        ({"id": 5, "op": 17, "args": {}}, -95),
        ({"id": 5, "op": "iommu_op", "args": {"buf": "text", "count": 1}}, -22),
        ({"id": 5, "op": "iommu_op", "args": {"buf": b"", "count": "1"}}, -22),
        ({"id": 5, "op": "iommu_op", "args": {"buf": b"", "count": True}}, -22),
        ({"id": 5, "op": "iommu_op", "args": {"count": 0}}, -22),
        ({"id": 5, "op": "iommu_op", "args": {"buf": b"", "count": 0, "extra": 1}}, -22),
        ({"id": 5, "op": "iommu_op", "args": [1, 2]}, -22),
        ({"id": -1, "op": "iommu_op", "args": {"buf": b"", "count": 0}}, -22),
        ({"id": "x", "op": "iommu_op", "args": {"buf": b"", "count": 0}}, -22),
        ({"id": 2**40, "op": "iommu_op", "args": {"buf": b"", "count": 0}}, -22),
        ({"id": 5, "op": "device_dma", "args": {"bdf": "nonsense", "addr": 0, "length": 1}}, -22),
        ({"id": 5, "op": "guest_write", "args": {"gfn": 1, "offset": 4090, "data": b"0123456789"}}, -22),
    ],
)
def test_bad_requests_get_errors_and_the_session_continues(
    daemon: DaemonProcess, guest: tuple[int, str], message: dict[str, Any], ret: int
) -> None:
    raw = session(daemon, guest[1])
    raw.send(message)
    reply = raw.recv()
    assert reply is not None and reply["ret"] == ret and reply["message"]
    raw.send({"id": 6, "op": "iommu_op", "args": {"buf": bytes(ops.pack([ops.query_caps()])), "count": 1}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == 0 and reply["id"] == 6
    still_serving(daemon, guest[1])


@pytest.mark.parametrize("size", [1, 31, 33, 64 + 7])
def test_buffer_not_a_multiple_of_32(daemon: DaemonProcess, guest: tuple[int, str], size: int) -> None:
    raw = session(daemon, guest[1])
    raw.send({"id": 9, "op": "iommu_op", "args": {"buf": b"\x02" * size, "count": size // 32}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -22 and reply["buf"] == b"\x02" * size
    still_serving(daemon, guest[1])


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", b"\x92\x01\x02", b"\x05", b"\xa3abc", b"\x81\x01\x02", b"\x81\xa2id", b"\xdf\xff\xff\xff\xff"],
    ids=["reserved-byte", "array", "int", "string", "int-key", "truncated-map", "huge-map-header"],
)
def test_garbage_payloads(daemon: DaemonProcess, guest: tuple[int, str], payload: bytes) -> None:
    raw = session(daemon, guest[1])
    raw.send_bytes(struct.pack(">I", len(payload)) + payload)
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -74 and reply["id"] is None
    raw.send({"id": 7, "op": "domain_info", "args": {}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == 0
    still_serving(daemon, guest[1])


def test_oversize_frame_closes_the_connection(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = session(daemon, guest[1])
    raw.send_bytes(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 64)
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -90
    assert raw.recv() is None
    still_serving(daemon, guest[1])


def test_truncated_frame_then_hangup(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = session(daemon, guest[1])
    frame = encode({"id": 1, "op": "domain_info", "args": {}})
    raw.send_bytes(frame[:-3])
    raw.close()
    still_serving(daemon, guest[1])


def test_frame_split_into_single_bytes(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = session(daemon, guest[1])
    for byte in encode({"id": 4, "op": "domain_info", "args": {}}):
        raw.send_bytes(bytes([byte]))
    reply = raw.recv()
    assert reply is not None and reply["ret"] == 0 and reply["id"] == 4


def test_pipelined_requests_answered_in_order(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    raw = session(daemon, guest[1])
    raw.send_bytes(b"".join(encode({"id": i, "op": "domain_info", "args": {}}) for i in range(10, 20)))
    assert [(raw.recv() or {}).get("id") for _ in range(10)] == list(range(10, 20))


def test_raw_msgpack_of_a_map_with_binary_buffer(daemon: DaemonProcess, guest: tuple[int, str]) -> None:
    """The envelope is plain msgpack: any library's encoding of the map works."""
    raw = session(daemon, guest[1])
    body = msgpack.packb({"op": "iommu_op", "id": 8, "args": {"count": 1, "buf": bytes(ops.pack([ops.query_caps()]))}})
    raw.send_bytes(struct.pack(">I", len(body)) + body)
    reply = raw.recv()
    assert reply is not None and reply["ret"] == 0
    assert ops.unpack(reply["buf"])[0].flags & ops.MAP_CAP


# -- scheduling and lifecycle ------------------------------------------------------------------------------
BIG = 65536


def big_batch() -> bytes:
    half = [ops.map_page(0x100000 + i, i % 64, ops.R) for i in range(BIG // 2)]
    return bytes(ops.pack(half + [ops.unmap_page(0x100000 + i) for i in range(BIG // 2)]))


def test_sigterm_finishes_in_flight_batches(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, *daemon_flags(dict(BASE)), "--log-json", "--log-level", "info")
    with SyncControlClient.connect(daemon.control_path) as ctl:
        reply = ctl.create_domain("hvm", 64)
        ctl.assign_device(reply["domid"], "00:08.0")
        raw = session(daemon, reply["token"])
        raw.send({"id": 2, "op": "iommu_op", "args": {"buf": big_batch(), "count": BIG}})
        raw.sock.shutdown(socket.SHUT_WR)
        # the batch is in flight once its first segment has flushed (continuations let us ask)
        while not next(d for d in ctl.list_domains() if d["domid"] == reply["domid"])["flushes"]["added"]:
            pass
        daemon.proc.send_signal(signal.SIGTERM)
    done = raw.recv()
    assert done is not None and done["ret"] == 0
    assert set(ops.statuses(ops.unpack(done["buf"]))) == {"OK"}
    assert daemon.stop() == 0
    assert not daemon.hypercall_path.exists() and not daemon.control_path.exists()
    events = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "signal" and e["signal"] == "SIGTERM" for e in events)
    assert any(e["event"] == "stopped" for e in events)


def test_refusals_are_logged_at_warning_as_json(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, *daemon_flags(dict(BASE)), "--log-json")
    try:
        raw = Raw(daemon.hypercall_path)
        raw.hello("not-a-token")
        raw.recv()
    finally:
        daemon.stop()
    events = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == "refused"]
    assert refused and refused[0]["level"] == "warning" and refused[0]["error"] == "-EACCES"
