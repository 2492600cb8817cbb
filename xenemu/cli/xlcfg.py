"""xl's domain configuration files (xl.cfg): ``KEY = VALUE`` settings, a value a string (single
or double quotes), a number (decimal or 0x hex) or a ``[...]`` list of them that may span lines;
``#`` comments; settings end at a newline or ``;``; ``KEY += VALUE`` appends to a list.

``parse`` returns the settings; ``domain_spec`` reads the keys xenemu knows (README "The
toolstack and xl") and says which it ignored. A syntax error is one ``ConfigError`` naming the
line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xenemu.cli.params import FRAMES_PER_MIB, normal_bdf

Value = str | int | list[str | int]

TOKEN_RE = re.compile(
    r"""(?P<space>[ \t\r]+)|(?P<comment>\#[^\n]*)|(?P<newline>\n)|(?P<semi>;)
    |(?P<append>\+=)|(?P<equals>=)|(?P<open>\[)|(?P<close>\])|(?P<comma>,)
    |(?P<string>"[^"\n]*"|'[^'\n]*')|(?P<number>0[xX][0-9a-fA-F]+|\d+)(?![A-Za-z_0-9])
    |(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)""",
    re.VERBOSE,
)
#: The most a file may hold: a domain's configuration, not a data set.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """A configuration that cannot be read: ``file:line: what``."""


def tokens(text: str, source: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    line, pos = 1, 0
    while pos < len(text):
        match = TOKEN_RE.match(text, pos)
        if match is None:
            raise ConfigError(f"{source}:{line}: unexpected {text[pos : pos + 10]!r}")
        kind = match.lastgroup or ""
        if kind == "newline":
            out.append(("end", "\n", line))
            line += 1
        elif kind == "semi":
            out.append(("end", ";", line))
        elif kind not in ("space", "comment"):
            out.append((kind, match.group(), line))
        pos = match.end()
    out.append(("end", "", line))
    return out


def scalar(kind: str, text: str) -> str | int:
    return text[1:-1] if kind == "string" else int(text, 0)


def parse(text: str, source: str = "config") -> dict[str, Value]:
    """Every setting in ``text``, in order; a later setting of a key wins, as in xl."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    toks = tokens(text, source)
    settings: dict[str, Value] = {}
    i = 0

    def expect(kinds: tuple[str, ...], what: str) -> tuple[str, str, int]:
        nonlocal i
        tok = toks[i]
        if tok[0] not in kinds:
            found = "end of line" if tok[0] == "end" else repr(tok[1])
            raise ConfigError(f"{source}:{tok[2]}: expected {what}, found {found}")
        i += 1
        return tok

    while i < len(toks):
        if toks[i][0] == "end":
            i += 1
            continue
        _, key, line = expect(("ident",), "a setting name")
        _, op, _ = expect(("equals", "append"), "'=' after " + repr(key))
        kind, text_, _ = expect(("string", "number", "open"), f"a value for {key!r}")
        value: Value
        if kind == "open":
            items: list[str | int] = []
            while True:
                while toks[i][0] == "end" and toks[i][1] == "\n":  # a list may span lines
                    i += 1
                if toks[i][0] == "close":
                    i += 1
                    break
                ikind, itext, _ = expect(("string", "number"), f"a list item or ']' in {key!r}")
                items.append(scalar(ikind, itext))
                while toks[i][0] == "end" and toks[i][1] == "\n":
                    i += 1
                if toks[i][0] == "comma":
                    i += 1
                elif toks[i][0] != "close":
                    expect(("comma", "close"), f"',' or ']' in {key!r}")
            value = items
        else:
            value = scalar(kind, text_)
        if op == "+=":
            before = settings.get(key, [])
            if not isinstance(before, list) or not isinstance(value, list):
                raise ConfigError(f"{source}:{line}: '+=' needs a list on both sides ({key!r})")
            value = before + value
        settings[key] = value
        expect(("end",), f"end of line after {key!r}")
    return settings


@dataclass
class DeviceSpec:
    """One ``pci=`` entry: ``BDF[,its_devid=N][,its_events=N][,pits=N][,rmrr=START:COUNT]...``."""

    bdf: str
    rmrr: list[tuple[int, int]] = field(default_factory=list)
    its_devid: int | None = None
    its_events: int = 0
    pits: int = 0


@dataclass
class DomainSpec:
    """What ``xenemu create`` sends, from a file and/or options."""

    name: str = ""
    kind: str = "hvm"
    frames: int = FRAMES_PER_MIB
    max_pages: int | None = None
    vcpus: int = 1
    pin: list[int] | None = None
    target: int | str | None = None
    max_mappings: int | None = None
    devices: list[DeviceSpec] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_rmrr(text: str) -> tuple[int, int]:
    start, _, count = text.partition(":")
    try:
        first, number = int(start, 0), int(count or "1", 0)
    except ValueError:
        raise ValueError(f"{text!r}: want START[:COUNT] in frames") from None
    if first < 0 or number < 1:
        raise ValueError(f"{text!r}: want START >= 0 and COUNT >= 1")
    return first, number


def device_spec(text: str) -> DeviceSpec:
    """xl's PCI_SPEC_STRING with xenemu's keys; xl's own (``permissive``, ``msitranslate``...)
    are accepted and have no effect here."""
    bdf, *options = (part.strip() for part in text.split(","))
    spec = DeviceSpec(normal_bdf(bdf.split("@")[0]))
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"{option!r} in {text!r}: want KEY=VALUE")
        if key == "rmrr":
            spec.rmrr.append(parse_rmrr(value))
            continue
        if key not in ("its_devid", "its_events", "pits"):
            continue  # xl's PCI keys (permissive=, seize=, ...): nothing to emulate
        try:
            number = int(value, 0)
        except ValueError:
            raise ValueError(f"{option!r} in {text!r}: want an integer") from None
        if number < 0:
            raise ValueError(f"{option!r} in {text!r}: must not be negative")
        setattr(spec, key, number)
    return spec


#: xl keys read; anything else in a file is reported as ignored (a real xl.cfg has disks, vifs...).
KNOWN_KEYS = ("name", "type", "builder", "memory", "maxmem", "vcpus", "cpus", "pci", "target", "max_mappings")


def want_int(key: str, value: Value, minimum: int = 0) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def domain_spec(settings: dict[str, Value]) -> DomainSpec:
    """The domain a configuration describes; ``ValueError`` naming the key that is wrong."""
    spec = DomainSpec()
    for key, value in settings.items():
        if key == "name":
            spec.name = str(value)
        elif key in ("type", "builder"):
            kind = str(value).lower()
            if kind not in ("pv", "hvm", "pvh"):
                raise ValueError(f'{key} must be "pv", "hvm" or "pvh", not {value!r}')
            spec.kind = "hvm" if kind == "pvh" else kind  # PVH is an HVM container to the IOMMU
        elif key == "memory":
            spec.frames = want_int(key, value, 1) * FRAMES_PER_MIB
        elif key == "maxmem":
            spec.max_pages = want_int(key, value, 1) * FRAMES_PER_MIB
        elif key == "vcpus":
            spec.vcpus = want_int(key, value, 1)
        elif key == "cpus":
            cpus = value if isinstance(value, list) else [value]
            spec.pin = [want_int("cpus[]", c) for c in cpus]
        elif key == "pci":
            if not isinstance(value, list):
                raise ValueError(f'pci must be a list, as pci = ["00:03.0"], not {value!r}')
            spec.devices = [device_spec(str(d)) for d in value]
        elif key == "target":
            if isinstance(value, list):
                raise ValueError(f"target must be a domain id or name, not {value!r}")
            spec.target = int(value) if isinstance(value, str) and value.isdigit() else value
        elif key == "max_mappings":
            spec.max_mappings = want_int(key, value)
        else:
            spec.ignored.append(key)
    if spec.pin is not None and len(spec.pin) == 1 and spec.vcpus > 1:
        spec.pin = spec.pin * spec.vcpus  # cpus = "2": every vCPU on CPU 2
    return spec
