"""The limits the shell enforces on peers, apart from the shell so a toolstack verb can show the
defaults without loading trio's server or the hypervisor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one peer may consume: connections, and time to say hello."""

    max_connections: int = 256
    max_connections_per_domain: int = 16
    hello_timeout: float = 10.0
