"""Fuzzing with hypothesis: the codec, the typed parse and dispatch, and the live daemon."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conformance.beds import DaemonProcess
from tests.conformance.conftest import BASE, daemon_flags
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, SyncHypercallClient
from xenemu.core.actions.dispatch import ACTIONS
from xenemu.core.errors import HypercallError
from xenemu.fuzzing import feed, fuzz_host
from xenemu.wire import MAX_FRAME, FrameDecoder, WireError, encode

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=96),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
op_names = st.sampled_from(sorted(ACTIONS)) | st.text(max_size=12)


def frame(op: Any, args: Any) -> bytes:
    return encode({"id": 1, "op": op, "args": args})


def plausible_args() -> st.SearchStrategy[dict[str, Any]]:
    buf = st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.builds(
                ops.Op,
                st.integers(0, 8),
                st.integers(0, 0xFFFF),
                st.integers(0, 2**64 - 1),
                st.integers(0, 80),
                st.integers(0, 8),
                st.integers(0, 3),
            ),
            max_size=5,
        ).map(lambda o: bytes(ops.pack(o))),
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "buf": buf,
            "count": st.integers(-1, 10),
            "gfns": st.lists(st.integers(-1, 64), max_size=6),
            "ioserver": st.integers(0, 3),
            "target": st.integers(0, 5),
            "gfn": st.integers(-1, 64),
            "offset": st.integers(-1, 5000),
            "length": st.integers(-1, 5000),
            "data": st.binary(max_size=64),
            "bdf": st.sampled_from(["00:03.0", "00:05.0", "x"]),
            "addr": st.integers(-1, 2**40),
            "ref": st.integers(-1, 1100),
            "domid": st.integers(0, 0x7FFF),
            "cmd": st.text(max_size=16),
            "read_pointer": st.integers(0, 2**32),
            "id": st.integers(0, 5),
        },
    )


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=12))
def test_decoder_takes_any_bytes(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
        while (message := decoder.next()) is not None:
            assert isinstance(message, dict | WireError)
            if isinstance(message, WireError) and message.fatal:
                assert decoder.poisoned and decoder.next() is None


@settings(max_examples=200, deadline=None)
@given(message=st.dictionaries(st.text(max_size=10), values, max_size=6), cut=st.integers(0, 64))
def test_frames_round_trip_and_split_anywhere(message: dict[str, Any], cut: int) -> None:
    data = encode(message)
    decoder = FrameDecoder()
    decoder.feed(data[:cut])
    first = decoder.next()
    decoder.feed(data[cut:])
    got = first if first is not None else decoder.next()
    assert got == msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)


def test_oversize_header_poisons() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", MAX_FRAME + 1) + b"x")
    error = decoder.next()
    assert isinstance(error, WireError) and error.fatal and error.errno == 90


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=op_names, args=st.one_of(plausible_args(), values))
def test_any_request_is_an_action_or_an_errno(op: Any, args: Any) -> None:
    """Typed parse then dispatch against a real host: no other exception, audit clean."""
    outcomes = feed(fuzz_host(), frame(op, args))
    assert len(outcomes) == 1
    for outcome in outcomes:
        assert isinstance(outcome, HypercallError | WireError | dict)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_any_byte_stream_through_the_request_path(data: bytes) -> None:
    feed(fuzz_host(), data)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("live"), *daemon_flags(dict(BASE)))
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 32)
            ctl.assign_device(guest["domid"], "00:0e.0")
            yield daemon, guest["token"]
    finally:
        daemon.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), hello=st.booleans(), structured=st.lists(st.tuples(op_names, values), max_size=3))
def test_the_daemon_survives_any_stream(
    live: tuple[DaemonProcess, str], data: bytes, hello: bool, structured: list[tuple[Any, Any]]
) -> None:
    daemon, token = live
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.hypercall_path))
    stream = frame("hello", {"version": 1, "token": token}) if hello else b""
    stream += b"".join(frame(op, args) for op, args in structured) + data
    try:
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
        decoder = FrameDecoder()
        while chunk := sock.recv(1 << 16):
            decoder.feed(chunk)
            while (reply := decoder.next()) is not None:
                assert isinstance(reply, dict) and isinstance(reply.get("ret"), int)
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    with SyncHypercallClient.connect(daemon.hypercall_path, token) as xc:
        assert xc.iommu_op([ops.query_caps()])[0].status == 0
    with SyncControlClient.connect(daemon.control_path) as ctl:
        assert ctl.audit() == []
