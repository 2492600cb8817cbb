"""The wire protocol itself: framing, handshake and identity, errors (PROTOCOL.md 1-5, 10
and 12.1). These cases speak raw frames, so they run against a daemon only."""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from xenemu.abi import pv_iommu as ops
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Raw, Target
from xenemu.wire import MAX_FRAME, encode

S = "12.1"


def guest(t: Target) -> tuple[int, str]:
    reply = t.domain("hvm", 64)
    t.control.assign_device(reply["domid"], "00:07.0")
    return reply["domid"], reply["token"]


def still_serving(t: Target, token: str) -> None:
    """After bad input: a good client is served and the audit is clean."""
    with t.connect(token) as xc:
        (caps,) = xc.iommu_op([ops.query_caps()])
        assert caps.status == 0 and caps.flags & ops.MAP_CAP, "a good client is no longer served"
    t.check()


def session(t: Target, token: str) -> Raw:
    raw = t.socket()
    assert (raw.hello(token) or {}).get("ret") == 0, "hello with a good token failed"
    return raw


@rule("PROTO-HELLO", S, "hello with a domain's token answers version, domid and max_frame")
def hello(t: Target) -> None:
    domid, token = guest(t)
    reply = t.socket().hello(token)
    assert reply is not None
    assert reply["ret"] == 0 and reply["id"] == 1 and reply["domid"] == domid
    assert reply["version"] == 1 and reply["max_frame"] == MAX_FRAME


@rule("PROTO-BAD-TOKEN", S, "a token that names no live domain (or is no string) is -EACCES, then closed")
def bad_token(t: Target) -> None:
    _, token = guest(t)
    for bad in ("0" * 32, "", None, "x" * 200):
        raw = t.socket()
        reply = raw.hello(bad)
        assert reply is not None and reply["ret"] == -13 and reply["error"] == "EACCES", f"token {bad!r:.20}"
        assert raw.recv() is None, f"the connection stayed open after token {bad!r:.20}"
    raw = t.socket()
    raw.send({"id": 1, "op": "hello", "args": {"version": 1, "token": 12345}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -13, "an integer token"
    still_serving(t, token)


@rule("PROTO-HELLO-SIZE", S, "before hello a frame holds at most 1,024 bytes: -EMSGSIZE, then closed")
def hello_size(t: Target) -> None:
    _, token = guest(t)
    raw = t.socket()
    reply = raw.hello("x" * 10_000)
    assert reply is not None and reply["ret"] == -90 and reply["error"] == "EMSGSIZE"
    assert raw.recv() is None
    still_serving(t, token)


@rule("PROTO-VERSION", S, "hello with a version other than the integer 1 is -EPROTONOSUPPORT, then closed")
def version(t: Target) -> None:
    _, token = guest(t)
    for bad in (2, True, 1.0):
        raw = t.socket()
        raw.send({"id": 1, "op": "hello", "args": {"version": bad, "token": token}})
        reply = raw.recv()
        assert reply is not None and reply["ret"] == -93, f"version {bad!r}"
        assert raw.recv() is None, f"the connection stayed open after version {bad!r}"


@rule("PROTO-BEFORE-HELLO", S, "a request before hello is -EPROTO, then closed; a second hello is -EPROTO")
def before_hello(t: Target) -> None:
    _, token = guest(t)
    raw = t.socket()
    raw.send({"id": 3, "op": "iommu_op", "args": {"buf": b"", "count": 0}})
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -71 and reply["id"] == 3
    assert raw.recv() is None
    raw = session(t, token)
    reply = raw.hello(token)
    assert reply is not None and reply["ret"] == -71, "a second hello"
    still_serving(t, token)


@rule("PROTO-CHANNELS", S, "each socket serves only its own requests (-EPERM for the other's)")
def channels(t: Target) -> None:
    _, token = guest(t)
    xc = session(t, token)
    xc.send({"id": 2, "op": "create_domain", "args": {"type": "hvm", "memory": 1}})
    reply = xc.recv()
    assert reply is not None and reply["ret"] == -1, "create_domain on the hypercall socket"
    ctl = t.socket("control")
    assert (ctl.hello(None) or {}).get("ret") == 0
    ctl.send({"id": 2, "op": "iommu_op", "args": {"buf": b"", "count": 0}})
    reply = ctl.recv()
    assert reply is not None and reply["ret"] == -1, "iommu_op on the control socket"


@rule("PROTO-CONTROL-PRIVATE", S, "control.sock is mode 0600")
def control_private(t: Target) -> None:
    mode = t.control_path.stat().st_mode & 0o777
    assert mode == 0o600, f"control.sock is {mode:04o}"


@rule("PROTO-DESTROYED", S, "destroying a domain closes its connections and kills its token")
def destroyed(t: Target) -> None:
    reply = t.domain("hvm", 8)
    raw = t.socket()
    assert (raw.hello(reply["token"]) or {})["ret"] == 0
    t.control.destroy_domain(reply["domid"])
    t.forget(reply["domid"])
    assert raw.recv() is None, "the destroyed domain's connection stayed open"
    assert (t.socket().hello(reply["token"]) or {})["ret"] == -13, "the destroyed domain's token still works"


BAD_REQUESTS: list[tuple[dict[str, Any], int]] = [
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
]


@rule("PROTO-BAD-REQUEST", S, "a bad op, id or argument gets its error reply with a message; the session goes on")
def bad_requests(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    for message, ret in BAD_REQUESTS:
        raw.send(message)
        reply = raw.recv()
        assert reply is not None and reply["ret"] == ret and reply["message"], f"{message!r:.90}: {reply!r:.90}"
        raw.send({"id": 6, "op": "iommu_op", "args": {"buf": bytes(ops.pack([ops.query_caps()])), "count": 1}})
        reply = raw.recv()
        assert reply is not None and reply["ret"] == 0 and reply["id"] == 6, f"after {message!r:.90}"
    still_serving(t, token)


@rule("PROTO-BUFFER-SIZE", S, "an iommu_op buffer not a multiple of 32 bytes is -EINVAL, the buffer unchanged")
def buffer_size(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    for size in (1, 31, 33, 64 + 7):
        raw.send({"id": 9, "op": "iommu_op", "args": {"buf": b"\x02" * size, "count": size // 32}})
        reply = raw.recv()
        assert reply is not None and reply["ret"] == -22 and reply["buf"] == b"\x02" * size, f"{size} bytes"
    still_serving(t, token)


GARBAGE = [b"\xc1", b"\x92\x01\x02", b"\x05", b"\xa3abc", b"\x81\x01\x02", b"\x81\xa2id", b"\xdf\xff\xff\xff\xff"]


@rule("PROTO-GARBAGE", S, "a well-framed payload that is not a map of string keys is -EBADMSG with id nil; kept open")
def garbage(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    for payload in GARBAGE:
        raw.send_bytes(struct.pack(">I", len(payload)) + payload)
        reply = raw.recv()
        assert reply is not None and reply["ret"] == -74 and reply["id"] is None, f"payload {payload!r}"
        raw.send({"id": 7, "op": "domain_info", "args": {}})
        reply = raw.recv()
        assert reply is not None and reply["ret"] == 0, f"after payload {payload!r}"
    still_serving(t, token)


@rule("PROTO-OVERSIZE", S, "a length above MAX_FRAME is -EMSGSIZE, then closed")
def oversize(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    raw.send_bytes(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 64)
    reply = raw.recv()
    assert reply is not None and reply["ret"] == -90
    assert raw.recv() is None
    still_serving(t, token)


@rule("PROTO-TRUNCATED", S, "a truncated frame followed by end of stream is dropped silently")
def truncated(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    raw.send_bytes(encode({"id": 1, "op": "domain_info", "args": {}})[:-3])
    raw.close()
    still_serving(t, token)


@rule("PROTO-SPLIT", S, "a frame may arrive one byte at a time")
def split(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    for byte in encode({"id": 4, "op": "domain_info", "args": {}}):
        raw.send_bytes(bytes([byte]))
    reply = raw.recv()
    assert reply is not None and reply["ret"] == 0 and reply["id"] == 4


@rule("PROTO-PIPELINE", S, "pipelined requests are answered in order")
def pipeline(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    raw.send_bytes(b"".join(encode({"id": i, "op": "domain_info", "args": {}}) for i in range(10, 20)))
    assert [(raw.recv() or {}).get("id") for _ in range(10)] == list(range(10, 20))


@rule("PROTO-PLAIN-MSGPACK", S, "the envelope is plain msgpack: any library's encoding of the map works")
def plain_msgpack(t: Target) -> None:
    _, token = guest(t)
    raw = session(t, token)
    body = msgpack.packb({"op": "iommu_op", "id": 8, "args": {"count": 1, "buf": bytes(ops.pack([ops.query_caps()]))}})
    raw.send_bytes(struct.pack(">I", len(body)) + body)
    reply = raw.recv()
    assert reply is not None and reply["ret"] == 0
    assert ops.unpack(reply["buf"])[0].flags & ops.MAP_CAP
