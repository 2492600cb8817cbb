"""Images in transit over the control socket: read out in chunks after a save, written in
chunks before a restore.

A frame holds at most 4 MiB (PROTOCOL.md section 2), and an image holds a whole domain, so it
crosses the wire as chunks of at most ``CHUNK`` bytes, by offset. A few transfers may be open at
once; one more evicts the oldest (a toolstack that died mid-transfer holds nothing for ever), and
every image is bounded by what this host's RAM could hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xenemu.core.errors import E2BIG, EINVAL, ENOENT, HypercallError
from xenemu.core.memory.frames import PAGE_SIZE

#: The most bytes one image_read or image_write carries (a quarter of a frame).
CHUNK = 1 << 20
#: Transfers open at once; one more evicts the oldest.
MAX_TRANSFERS = 8
#: Room beyond the pages themselves: records, JSON, IOMMU entries of sparse leaves.
OVERHEAD = 64 << 20


@dataclass
class Transfer:
    #: "out": a saved image being read; "in": a restore's image being written.
    direction: str
    data: bytes | bytearray = field(default_factory=bytearray)
    #: Bytes an incoming image will have (declared at ``begin``).
    size: int = 0


class ImageStore:
    """Open transfers by id (ids rise and are never reused)."""

    def __init__(self, nr_frames: int) -> None:
        self.transfers: dict[int, Transfer] = {}
        self.next_id = 1
        #: The largest image this host could have produced or could restore.
        self.max_image = nr_frames * (PAGE_SIZE + 40) + OVERHEAD

    def _open(self, transfer: Transfer) -> int:
        while len(self.transfers) >= MAX_TRANSFERS:
            del self.transfers[min(self.transfers)]
        image = self.next_id
        self.next_id += 1
        self.transfers[image] = transfer
        return image

    def _get(self, image: int, direction: str) -> Transfer:
        transfer = self.transfers.get(image)
        if transfer is None or transfer.direction != direction:
            raise HypercallError(-ENOENT, f"no {'saved' if direction == 'out' else 'incoming'} image {image}")
        return transfer

    def put(self, data: bytes) -> int:
        """A saved image, to be read out."""
        return self._open(Transfer("out", data, len(data)))

    def read(self, image: int, offset: int, length: int) -> bytes:
        transfer = self._get(image, "out")
        if not 0 <= offset <= transfer.size or not 0 <= length <= CHUNK:
            raise HypercallError(-EINVAL, f"read within the image, at most {CHUNK} bytes at a time")
        return bytes(transfer.data[offset : offset + length])

    def begin(self, size: int) -> int:
        """An image of ``size`` bytes will be written in."""
        if size <= 0:
            raise HypercallError(-EINVAL, "an image has a size")
        if size > self.max_image:
            raise HypercallError(-E2BIG, f"an image of {size} bytes; this host takes at most {self.max_image}")
        return self._open(Transfer("in", bytearray(), size))

    def write(self, image: int, offset: int, data: bytes) -> int:
        """Append a chunk (at the offset where the last one ended); returns the bytes held."""
        transfer = self._get(image, "in")
        assert isinstance(transfer.data, bytearray)
        if offset != len(transfer.data) or len(data) > CHUNK or offset + len(data) > transfer.size:
            raise HypercallError(
                -EINVAL, f"write chunks in order, at most {CHUNK} bytes, within the {transfer.size} declared"
            )
        transfer.data += data
        return len(transfer.data)

    def take(self, image: int) -> bytes | bytearray:
        """The incoming image, whole or not (the decoder says what is wrong), closed."""
        transfer = self._get(image, "in")
        del self.transfers[image]
        return transfer.data

    def close(self, image: int) -> None:
        if self.transfers.pop(image, None) is None:
            raise HypercallError(-ENOENT, f"no image {image}")
