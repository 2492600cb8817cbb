"""The wire codec, sans-IO: bytes in, messages out (and back), with no sockets in sight.

A frame is a 4-byte big-endian payload length, then one msgpack map of that many bytes.
The decoder refuses what it cannot trust: a length above its limit poisons the stream
(the peer must be disconnected), while a well-framed payload that is not a msgpack map, or
that holds a string, byte string, array or map longer than its limits allow, is reported and
skipped, since the framing still holds. The limits are checked by msgpack on each header,
before anything of that size is built. A server decodes with ``HELLO_LIMITS`` until the peer
has said hello (a hello is a few dozen bytes) and with ``REQUEST_LIMITS`` after; a client
trusts its daemon and decodes with ``PERMISSIVE``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from xenemu.abi.errno import EBADMSG, EMSGSIZE

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
#: Largest payload: a full 65,536-op batch (2 MiB) with room to spare.
MAX_FRAME = 4 * 1024 * 1024

Message = dict[str, Any]


@dataclass(frozen=True)
class DecodeLimits:
    """The most a frame, and each msgpack string, byte string, array, map and ext, may hold."""

    max_frame: int
    max_str: int
    max_bin: int
    max_array: int
    max_map: int
    max_ext: int
    #: Arrays and maps in one message, and their elements in all (0: no bound).  msgpack's own
    #: limits are per container, so without these a frame of nested empty arrays is millions
    #: of objects (4 MiB became 4.2M lists: 1.5 s of decoding and 300 MB).
    max_containers: int = 0
    max_elements: int = 0

    def unpack_options(self) -> dict[str, int]:
        return {
            "max_str_len": self.max_str,
            "max_bin_len": self.max_bin,
            "max_array_len": self.max_array,
            "max_map_len": self.max_map,
            "max_ext_len": self.max_ext,
        }


#: Before hello: the handshake and nothing more (a token is 32 characters).
HELLO_LIMITS = DecodeLimits(
    max_frame=1024, max_str=256, max_bin=256, max_array=16, max_map=16, max_ext=0, max_containers=8, max_elements=64
)
#: After hello: a 65,536-op batch, 65,536 GFNs (twice that, so a list a little too long is
#: told -E2BIG by the typed parse), names and identifiers of up to 4,096 characters.
REQUEST_LIMITS = DecodeLimits(
    max_frame=MAX_FRAME,
    max_str=4096,
    max_bin=MAX_FRAME,
    max_array=2 * 65536,
    max_map=64,
    max_ext=0,
    max_containers=256,
    max_elements=2 * 65536 + 4096,
)
#: What a client accepts from its daemon: anything a frame can hold.
PERMISSIVE = DecodeLimits(
    max_frame=MAX_FRAME, max_str=MAX_FRAME, max_bin=MAX_FRAME, max_array=MAX_FRAME, max_map=MAX_FRAME, max_ext=MAX_FRAME
)


@dataclass(frozen=True)
class WireError:
    """A frame that could not be decoded; ``fatal`` means the stream is no longer framed."""

    errno: int
    message: str
    fatal: bool


class FrameDecoder:
    """Feed it bytes as they arrive; take whole messages (or errors) out."""

    def __init__(self, limits: DecodeLimits = PERMISSIVE) -> None:
        self._buf = bytearray()
        #: The limits the next frame is decoded with (a server tightens them before hello).
        self.limits = limits
        self.poisoned = False

    def feed(self, data: bytes) -> None:
        if not self.poisoned:
            self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next(self) -> Message | WireError | None:
        """The next message, a ``WireError``, or None until more bytes arrive."""
        if self.poisoned or len(self._buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf)
        limit = self.limits.max_frame
        if length > limit:
            self.poisoned = True
            self._buf.clear()
            return WireError(EMSGSIZE, f"frame of {length} bytes exceeds the {limit}-byte limit", fatal=True)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view, view[HEADER.size : end] as payload:
            message = decode_payload(payload, self.limits)  # decoded in place: a 2 MiB batch is not copied first
        del self._buf[:end]
        return message


class _TooMany(Exception):
    pass


def _counter(limits: DecodeLimits) -> Callable[[Any], Any]:
    """A hook msgpack calls with each array and map it built: it stops the decoding as soon as
    the message holds more containers or elements than ``limits`` allow."""
    seen = [0, 0]

    def count(obj: Any) -> Any:
        seen[0] += 1
        seen[1] += len(obj)
        if seen[0] > limits.max_containers or seen[1] > limits.max_elements:
            raise _TooMany
        return obj

    return count


def decode_payload(payload: bytes | memoryview, limits: DecodeLimits = PERMISSIVE) -> Message | WireError:
    options: dict[str, Any] = dict(limits.unpack_options())
    if limits.max_containers:
        options["list_hook"] = options["object_hook"] = _counter(limits)
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True, **options)
    except _TooMany:
        return WireError(
            EBADMSG,
            f"payload holds more than {limits.max_containers} arrays and maps or {limits.max_elements} elements",
            fatal=False,
        )
    except ValueError as exc:
        if "exceeds max_" in str(exc):  # msgpack's own words, with lengths only: safe to echo
            return WireError(EBADMSG, f"payload exceeds a decoding limit: {str(exc)[:80]}", fatal=False)
        return WireError(EBADMSG, f"payload is not valid msgpack ({type(exc).__name__})", fatal=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        return WireError(EBADMSG, f"payload is not valid msgpack ({type(exc).__name__})", fatal=False)
    if not isinstance(message, dict) or not all(isinstance(k, str) for k in message):
        return WireError(EBADMSG, "payload must be a msgpack map with string keys", fatal=False)
    return message


def encode(message: Message) -> bytes:
    header, payload = encode_parts(message)
    return header + payload


def encode_parts(message: Message) -> tuple[bytes, bytes]:
    """The frame's header and payload apart, so a large reply is sent without joining them."""
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes exceeds MAX_FRAME")
    return HEADER.pack(len(payload)), payload
