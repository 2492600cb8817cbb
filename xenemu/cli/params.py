"""What the command line accepts, checked before anything is sent: integers in any base, sizes in
MiB as xl takes them, PCI addresses inside bus:dev(0-1f).fn(0-7), and a domain by id or name."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

from xenemu.cli.root import Refused

if TYPE_CHECKING:
    from xenemu.client import SyncControlClient

#: 4 KiB frames per MiB.
FRAMES_PER_MIB = 256
#: [SSSS:]BB:DD.F with DD a device number (0-0x1f) and F a function (0-7), as PCI has them.
BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
#: xl's size suffixes; a bare number is MiB (xl mem-set, mem-max).
SIZE_RE = re.compile(r"^(\d+)\s*([bkmgt]?)$", re.IGNORECASE)
UNIT_BYTES = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class BasedInt(click.ParamType[int]):
    """An integer in any base Python reads (4096, 0x1000, 0o10000), within [min, max] if given."""

    name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min, self.max = min, max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value), 0)
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            low = "" if self.min is None else f"{self.min:,}"
            high = "" if self.max is None else f"{self.max:,}"
            self.fail(f"{number} is out of range ({low}..{high})", param, ctx)
        return number


BASED_INT = BasedInt()
NATURAL = BasedInt(min=0)
POSITIVE = BasedInt(min=1)


def parse_size_mib(text: str) -> int:
    """xl's sizes: ``512`` is MiB, ``512m``, ``2g``, ``4096k``; whole 4 KiB frames, at least one.
    Returns frames; ``ValueError`` with a reason otherwise."""
    match = SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (MiB, or a number with b, k, m, g or t)")
    number, unit = int(match.group(1)), (match.group(2) or "m").lower()
    size = number * UNIT_BYTES[unit]
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be more than 0")
    if size % 4096:
        raise ValueError(f"{text!r} is not a whole number of 4 KiB frames")
    return size // 4096


class SizeMiB(click.ParamType[int]):
    """A size as xl takes it (MiB unless a suffix says otherwise); converted to frames."""

    name = "MiB"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        try:
            return parse_size_mib(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE_MIB = SizeMiB()


def normal_bdf(text: str) -> str:
    """``SSSS:BB:DD.F`` in lower case, segment 0000 if absent; ``ValueError`` outside PCI's ranges."""
    match = BDF_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a PCI address (want [SSSS:]BB:DD.F)")
    segment, bus, dev, fn = match.groups()
    if int(dev, 16) > 0x1F:
        raise ValueError(f"{text!r}: device {dev} is out of range (00-1f)")
    return f"{segment or '0000'}:{bus}:{dev}.{fn}".lower()


class Bdf(click.ParamType[str]):
    name = "BDF"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return normal_bdf(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


BDF = Bdf()


class DomainRef(click.ParamType[int | str]):
    """A domain by id (``3``) or by name (``web``), as xl takes it; names are looked up when the
    verb runs (``resolve``)."""

    name = "DOMAIN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        text = str(value)
        if text.isdigit():
            return int(text)
        if not text or len(text) > 64:
            self.fail(f"{text[:64]!r} is neither a domain id nor a domain name", param, ctx)
        return text


DOMAIN = DomainRef()


def resolve(ctl: SyncControlClient, ref: int | str) -> int:
    """The domid a reference names; a name no domain has is refused (exit 1) as xl does."""
    if isinstance(ref, int):
        return ref
    matches = [d["domid"] for d in ctl.list_domains() if d["name"] == ref]
    if not matches:
        raise Refused(f"no domain named {ref!r}")
    if len(matches) > 1:
        raise Refused(f"{len(matches)} domains are named {ref!r}: use the id")
    domid: int = matches[0]
    return domid
