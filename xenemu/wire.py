"""The wire codec, sans-IO: bytes in, messages out (and back), with no sockets in sight.

A frame is a 4-byte big-endian payload length, then one msgpack map of that many bytes.
The decoder refuses what it cannot trust: a length above ``MAX_FRAME`` poisons the stream
(the peer must be disconnected), while a well-framed payload that is not a msgpack map is
reported and skipped, since the framing still holds.
"""

from __future__ import annotations

import struct
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
class WireError:
    """A frame that could not be decoded; ``fatal`` means the stream is no longer framed."""

    errno: int
    message: str
    fatal: bool


class FrameDecoder:
    """Feed it bytes as they arrive; take whole messages (or errors) out."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
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
        if length > self._max:
            self.poisoned = True
            self._buf.clear()
            return WireError(EMSGSIZE, f"frame of {length} bytes exceeds the {self._max}-byte limit", fatal=True)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view, view[HEADER.size : end] as payload:
            message = decode_payload(payload)  # decoded in place: a 2 MiB batch is not copied first
        del self._buf[:end]
        return message


def decode_payload(payload: bytes | memoryview) -> Message | WireError:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
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
