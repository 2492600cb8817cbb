"""structlog set-up: readable lines on a terminal, JSON lines for machines, and a bounded ring
of the recent lines that the daemon hands to ``xenemu dmesg`` (as Xen's console ring).

The ring keeps at most ``RING_LINES`` lines of at most ``RING_LINE_BYTES`` characters each,
with anything unprintable escaped, so a peer that gets its data logged can neither grow the
daemon's memory nor put control characters on a toolstack user's terminal.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from typing import Any

import structlog

RING_LINES = 1000
RING_LINE_BYTES = 400


def printable(text: str) -> str:
    """``text`` with every unprintable character escaped (``\\x1b``, ``\\n``...)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class LogRing:
    """The last ``RING_LINES`` log lines, each clipped; ``dropped`` counts what fell out."""

    def __init__(self, size: int = RING_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=size)
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.dropped += 1
        line = printable(line[: RING_LINE_BYTES * 2])
        self.lines.append(line if len(line) <= RING_LINE_BYTES else line[: RING_LINE_BYTES - 1] + "…")

    def last(self, count: int) -> list[str]:
        return list(self.lines)[-count:] if count > 0 else []

    def __call__(self, logger: Any, method: str, event_dict: Any) -> Any:
        """A structlog processor: records the event as one ``key=value`` line, then passes it on."""
        fields = " ".join(f"{k}={v!s:.80}" for k, v in event_dict.items() if k not in ("event", "timestamp", "level"))
        stamp = str(event_dict.get("timestamp", ""))
        level = str(event_dict.get("level", method))
        self.add(f"{stamp} [{level}] {event_dict.get('event', '')!s:.120} {fields}".strip())
        return event_dict


#: The daemon's ring: filled by ``configure``'s processors, read by the ``dmesg`` request.
RECENT = LogRing()


def configure(json: bool = False, level: str = "info") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            RECENT,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
