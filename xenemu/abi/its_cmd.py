"""ITS commands: the 32-byte blocks of a command queue, decoded to fields and encoded back.

Field positions come from ``abi/gic_its.h``; a queue slot is read as four little-endian
doublewords, as the ITS reads guest RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xenemu.abi import const

CMD_SIZE = const("ITS_CMD_SIZE")
MOVI, INT, CLEAR, SYNC = const("GITS_CMD_MOVI"), const("GITS_CMD_INT"), const("GITS_CMD_CLEAR"), const("GITS_CMD_SYNC")
MAPD, MAPC, MAPTI, MAPI = (
    const("GITS_CMD_MAPD"),
    const("GITS_CMD_MAPC"),
    const("GITS_CMD_MAPTI"),
    const("GITS_CMD_MAPI"),
)
INV, INVALL, MOVALL, DISCARD = (
    const("GITS_CMD_INV"),
    const("GITS_CMD_INVALL"),
    const("GITS_CMD_MOVALL"),
    const("GITS_CMD_DISCARD"),
)
NAMES = {
    MOVI: "MOVI",
    INT: "INT",
    CLEAR: "CLEAR",
    SYNC: "SYNC",
    MAPD: "MAPD",
    MAPC: "MAPC",
    MAPTI: "MAPTI",
    MAPI: "MAPI",
    INV: "INV",
    INVALL: "INVALL",
    MOVALL: "MOVALL",
    DISCARD: "DISCARD",
}

#: The fields each command defines.
FIELDS: dict[int, tuple[str, ...]] = {
    MAPD: ("devid", "size", "itt", "valid"),
    MAPC: ("icid", "target", "valid"),
    MAPTI: ("devid", "eventid", "pintid", "icid"),
    MAPI: ("devid", "eventid", "icid"),
    MOVI: ("devid", "eventid", "icid"),
    INT: ("devid", "eventid"),
    CLEAR: ("devid", "eventid"),
    DISCARD: ("devid", "eventid"),
    INV: ("devid", "eventid"),
    SYNC: ("target",),
    INVALL: ("icid",),
    MOVALL: ("target", "target2"),
}

_LAYOUT = struct.Struct("<4Q")
ITT_MASK = const("ITS_CMD_ITT_ADDR_MASK")
TARGET_SHIFT, TARGET_MASK = const("ITS_CMD_TARGET_SHIFT"), const("ITS_CMD_TARGET_MASK")


#: (doubleword, shift, mask) of each shifted field, looked up once: a guest's queue is decoded
#: command by command on the scheduling path.
_FIELDS = {
    name: (const(f"ITS_CMD_{name}_DW"), const(f"ITS_CMD_{name}_SHIFT"), const(f"ITS_CMD_{name}_MASK"))
    for name in ("ID", "DEVID", "EVENTID", "PINTID", "SIZE", "ICID")
}
ITT_DW, TARGET_DW, TARGET2_DW = const("ITS_CMD_ITT_DW"), const("ITS_CMD_TARGET_DW"), const("ITS_CMD_TARGET2_DW")
VALID_DW, VALID_SHIFT = const("ITS_CMD_VALID_DW"), const("ITS_CMD_VALID_SHIFT")


def _field(raw: tuple[int, ...], name: str) -> int:
    dw, shift, mask = _FIELDS[name]
    return (raw[dw] >> shift) & mask


@dataclass(frozen=True)
class ItsCommand:
    """Every field a command may carry; which ones mean something depends on ``cmd``."""

    cmd: int
    devid: int = 0
    eventid: int = 0
    pintid: int = 0
    size: int = 0
    itt: int = 0
    icid: int = 0
    target: int = 0
    target2: int = 0
    valid: bool = False

    @property
    def name(self) -> str:
        return NAMES.get(self.cmd, f"0x{self.cmd:02x}")

    @classmethod
    def decode(cls, block: bytes) -> ItsCommand:
        """Only the fields the command defines (others alias them and would read as noise)."""
        raw = _LAYOUT.unpack(block)
        cmd = _field(raw, "ID")
        fields: dict[str, int | bool] = {}
        names = FIELDS.get(cmd, ())
        if "devid" in names:
            fields["devid"] = _field(raw, "DEVID")
        if "eventid" in names:
            fields["eventid"] = _field(raw, "EVENTID")
        if "pintid" in names:
            fields["pintid"] = _field(raw, "PINTID")
        if "size" in names:
            fields["size"] = _field(raw, "SIZE")
        if "itt" in names:
            fields["itt"] = raw[ITT_DW] & ITT_MASK
        if "icid" in names:
            fields["icid"] = _field(raw, "ICID")
        if "target" in names:
            fields["target"] = (raw[TARGET_DW] >> TARGET_SHIFT) & TARGET_MASK
        if "target2" in names:
            fields["target2"] = (raw[TARGET2_DW] >> TARGET_SHIFT) & TARGET_MASK
        if "valid" in names:
            fields["valid"] = bool(raw[VALID_DW] >> VALID_SHIFT & 1)
        return cls(cmd, **fields)  # type: ignore[arg-type]

    def encode(self) -> bytes:
        """The block as Linux's ITS driver builds it for this command."""
        dw = [0, 0, 0, 0]
        dw[0] = (self.cmd & 0xFF) | ((self.devid & 0xFFFFFFFF) << 32)
        if self.cmd == MAPD:
            dw[1] = self.size & 0x1F
            dw[2] = (self.itt & ITT_MASK) | (int(self.valid) << 63)
        elif self.cmd == MAPC:
            dw[2] = (self.icid & 0xFFFF) | ((self.target & TARGET_MASK) << TARGET_SHIFT) | (int(self.valid) << 63)
        elif self.cmd in (SYNC,):
            dw[2] = (self.target & TARGET_MASK) << TARGET_SHIFT
        elif self.cmd == MOVALL:
            dw[2] = (self.target & TARGET_MASK) << TARGET_SHIFT
            dw[3] = (self.target2 & TARGET_MASK) << TARGET_SHIFT
        elif self.cmd == INVALL:
            dw[2] = self.icid & 0xFFFF
        else:
            dw[1] = (self.eventid & 0xFFFFFFFF) | ((self.pintid & 0xFFFFFFFF) << 32)
            dw[2] = self.icid & 0xFFFF
        return _LAYOUT.pack(*dw)


def mapd(devid: int, size: int, itt: int, valid: bool = True) -> ItsCommand:
    return ItsCommand(MAPD, devid=devid, size=size, itt=itt, valid=valid)


def mapc(icid: int, target: int, valid: bool = True) -> ItsCommand:
    return ItsCommand(MAPC, icid=icid, target=target, valid=valid)


def mapti(devid: int, eventid: int, pintid: int, icid: int) -> ItsCommand:
    return ItsCommand(MAPTI, devid=devid, eventid=eventid, pintid=pintid, icid=icid)


def event_cmd(cmd: int, devid: int, eventid: int, icid: int = 0) -> ItsCommand:
    """INT, CLEAR, DISCARD, INV (and MOVI, with ``icid``)."""
    return ItsCommand(cmd, devid=devid, eventid=eventid, icid=icid)


def sync(target: int) -> ItsCommand:
    return ItsCommand(SYNC, target=target)


def invall(icid: int) -> ItsCommand:
    return ItsCommand(INVALL, icid=icid)


def movall(target: int, target2: int) -> ItsCommand:
    return ItsCommand(MOVALL, target=target, target2=target2)
