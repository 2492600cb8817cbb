"""What an action is: a typed request, validated field by field from the wire's plain values,
and the registry of one handler per action that the hypercall families fill.

Sizes come before contents: a list field declares the most elements it may hold
(``Annotated[list[int], MaxLen(65536)]``), and a longer list is refused with ``-E2BIG`` before
any of its elements is looked at, so a request's cost is bounded by the declaration, not by
what the peer sent. A list field without a ``MaxLen`` is a programming error, found when the
action's schema is first resolved.

Kept apart from ``dispatch`` so that the families import this and ``dispatch`` imports the
families: the registry is filled by plain imports, in one direction.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Literal, TypeVar

from xenemu.core.errors import E2BIG, EINVAL, HypercallError
from xenemu.core.host import Host

#: Which socket an action may arrive on ("internal": raised by the shell itself, never parsed).
Channel = Literal["hypercall", "control", "internal"]

#: What a running action yields to the shell (continuation points, waits).
Effect = Any
Outcome = Generator[Effect, None, Any]


@dataclasses.dataclass(frozen=True)
class MaxLen:
    """The most elements a list field may hold (``typing.Annotated`` metadata), checked first."""

    n: int


@dataclasses.dataclass(frozen=True)
class Action:
    """A request, already validated; ``caller`` is the domain the connection speaks for."""

    name: ClassVar[str] = ""
    channel: ClassVar[Channel] = "hypercall"

    @classmethod
    def from_wire(cls, args: Any) -> Action:
        """Build from a msgpack map, refusing unknown, missing or mistyped fields (-EINVAL)."""
        if not isinstance(args, dict):
            raise HypercallError(-EINVAL, f"{cls.name}: arguments must be a map")
        values: dict[str, Any] = {}
        fields, names = _schema(cls)
        for name, hint, required in fields:
            if name in args:
                values[name] = _check_type(cls.name, name, args[name], hint)
            elif required:
                raise HypercallError(-EINVAL, f"{cls.name}: missing argument {name!r}")
        unknown = args.keys() - names
        if unknown:
            raise HypercallError(-EINVAL, f"{cls.name}: unknown arguments {sorted(map(str, unknown))}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ControlAction(Action):
    """A toolstack request: only on the control socket."""

    channel: ClassVar[Channel] = "control"


Schema = tuple[list[tuple[str, Any, bool]], frozenset[str]]
_SCHEMAS: dict[type[Action], Schema] = {}


def _schema(cls: type[Action]) -> Schema:
    """Each field's name, type and whether it is required; resolved once per action type."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for name, hint in hints.items():
            _require_bounded_lists(cls, name, hint, bounded=False)
        fields = [
            (f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        ]
        schema = _SCHEMAS[cls] = (fields, frozenset(name for name, _, _ in fields))
    return schema


def _require_bounded_lists(cls: type, name: str, hint: Any, *, bounded: bool) -> None:
    """Every list in a field's type sits directly in an ``Annotated[..., MaxLen(n)]``."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(hint)
        has_bound = any(isinstance(m, MaxLen) for m in meta)
        _require_bounded_lists(cls, name, inner, bounded=has_bound)
        return
    if origin is list and not bounded:
        raise TypeError(f"{cls.__name__}.{name}: a list field needs Annotated[list[...], MaxLen(n)]")
    for arg in typing.get_args(hint) if origin is not Literal else ():
        _require_bounded_lists(cls, name, arg, bounded=False)


def _check_type(action: str, field: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(action, field, value, option)
            except HypercallError as exc:
                if exc.errno == -E2BIG:  # the right type, too long: that is the answer
                    raise
                continue
        raise HypercallError(-EINVAL, f"{action}: {field} has the wrong type")
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(hint)
        bound = next(m.n for m in meta if isinstance(m, MaxLen))
        if typing.get_origin(inner) is list and isinstance(value, list) and len(value) > bound:
            raise HypercallError(-E2BIG, f"{action}: {field} has {len(value)} elements, more than {bound}")
        return _check_type(action, field, value, inner)
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_check_type(action, field, v, item) for v in value]
    elif origin is tuple:
        items = typing.get_args(hint)
        if isinstance(value, list | tuple) and len(value) == len(items):
            return tuple(_check_type(action, field, v, t) for v, t in zip(value, items, strict=True))
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bytes:
        if isinstance(value, bytes | bytearray):
            return bytes(value)
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"{action}.{field}: unsupported field type {hint!r}")
    raise HypercallError(-EINVAL, f"{action}: {field} has the wrong type")


A = TypeVar("A", bound=Action)
Handler = Callable[[Host, int, Any], Any]

ACTIONS: dict[str, type[Action]] = {}
HANDLERS: dict[type[Action], Handler] = {}


def handles(action: type[A]) -> Callable[[Callable[[Host, int, A], Any]], Callable[[Host, int, A], Any]]:
    """Register ``fn`` as the handler of ``action`` (one handler per action)."""

    def register(fn: Callable[[Host, int, A], Any]) -> Callable[[Host, int, A], Any]:
        assert action.name and action.name not in ACTIONS, f"duplicate action {action.name!r}"
        ACTIONS[action.name] = action
        HANDLERS[action] = fn
        return fn

    return register
