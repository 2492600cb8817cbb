"""PCI devices as assignment knows them: BDFs, reserved (RMRR) regions, and what a DMA returned."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

#: SSSS:BB:DD.F, with the device number DD inside PCI's 5 bits (00-1f) and F inside its 3.
BDF_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[01][0-9a-fA-F]\.[0-7]$")


def normalise_bdf(bdf: str) -> str:
    """`"0000:03:00.0"`; a short `"03:00.0"` gets segment 0000."""
    if bdf.count(":") == 1:
        bdf = "0000:" + bdf
    if not BDF_RE.match(bdf):
        raise ValueError(f"bad PCI address {bdf!r} (want SSSS:BB:DD.F)")
    return bdf.lower()


@dataclass
class PciDevice:
    bdf: str
    domid: int
    #: Reserved regions as (first frame, frame count), identity-mapped in the context.
    rmrr: list[tuple[int, int]] = field(default_factory=list)
    #: Its ITS side (DeviceID, pITS, events, physical LPIs), if it raises MSIs.
    its: Any = None

    def rmrr_frames(self) -> list[int]:
        return [start + i for start, count in self.rmrr for i in range(count)]


@dataclass
class DmaResult:
    ok: bool
    data: bytes = b""
    #: On a fault: the bus frame that faulted and why.
    fault_bfn: int | None = None
    reason: str = ""
