"""The limits the shell enforces on peers, apart from the shell so a toolstack verb can show the
defaults without loading trio's server or the hypervisor.

PROTOCOL.md section 10 says what each one is for and what a peer that reaches it gets."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What peers may consume: connections, time, and queued events."""

    #: Hypercall connections that have said hello, in all.
    max_connections: int = 256
    #: Hypercall connections that have said hello, per domain.
    max_connections_per_domain: int = 4
    #: Seconds a new connection has to say hello (its replies must be read meanwhile too).
    hello_timeout: float = 10.0
    #: Hypercall connections that have not said hello yet; a new one evicts the oldest.
    max_awaiting_hello: int = 32
    #: Control connections (the toolstack's), counted apart from the hypercall socket's.
    max_control_connections: int = 32
    #: Seconds a peer has to take one frame the daemon sends it (reply, event or refusal).
    send_timeout: float = 10.0
    #: Seconds a frame begun after hello has to arrive whole.
    frame_timeout: float = 10.0
    #: Distinct events (IOREQ servers with news, LPIs) one connection may have waiting.
    max_queued_events: int = 1024
    #: Seconds in-flight requests get to finish at shutdown.
    shutdown_grace: float = 30.0


class LogBudget:
    """How many log lines a peer may cause: a token bucket (``rate`` a second, ``burst`` at
    once).  Without it a guest pipelining bad requests wrote 1.7 MB of log a second; past the
    budget lines are dropped, and the next line let through says how many were."""

    def __init__(self, rate: float = 10.0, burst: int = 20) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.dropped = 0

    def take(self) -> int | None:
        """None: drop this line; else how many were dropped since the last one let through."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            self.dropped += 1
            return None
        self.tokens -= 1
        dropped, self.dropped = self.dropped, 0
        return dropped
