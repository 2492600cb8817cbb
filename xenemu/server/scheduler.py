"""The scheduling of preempted requests: driving an action's generator through its effects.

The core never blocks and never awaits: a long action is a generator that yields an effect at
each continuation point and returns its result. Here each effect becomes a place where trio
may run someone else: a plain continuation point is one checkpoint (each other task that is
ready, every connection with a request waiting among them, gets a turn before a long batch
resumes); a ``WaitForIoreqs`` parks only the request that
yielded it until the host's state says the emulators have answered. Whoever owns the
notifications (the daemon) is told after each step, and calls ``wake`` when the host changed.

This room knows the core's effects and nothing of sockets or sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from xenemu.core.actions.dispatch import Outcome
from xenemu.core.host import Host
from xenemu.core.ioreq.balloon import WaitForIoreqs

log = structlog.get_logger("xenemu")


class Scheduler:
    """Runs actions' generators to completion, a step at a time, between other tasks."""

    def __init__(self, host: Host, stepped: Callable[[], None]) -> None:
        """``stepped`` runs after every step an action takes and once when it ends, however it ends."""
        self.host = host
        self._stepped = stepped
        self._changed = trio.Event()
        #: Seconds spent stepping each domain's requests (``xl list``'s Time), by domid.
        self.seconds: dict[int, float] = {}

    async def run(self, outcome: Outcome, domid: int | None = None) -> dict[str, Any]:
        """Drive an action's generator: a continuation point lets other sessions run; a wait
        for emulators parks only this request until the state it waits for comes about. The
        time its steps take (not its waits) is charged to ``domid``."""
        try:
            while True:
                began = time.perf_counter()
                try:
                    effect = next(outcome)
                except StopIteration as stop:
                    result: dict[str, Any] = stop.value
                    return result
                finally:
                    if domid is not None:
                        self.seconds[domid] = self.seconds.get(domid, 0.0) + time.perf_counter() - began
                self._stepped()
                if isinstance(effect, WaitForIoreqs):
                    while not effect.done(self.host.ioreq):
                        await self._changed.wait()
                else:
                    await trio.lowlevel.checkpoint()
        finally:
            # A request cut (at the shutdown deadline) ends here and now, not whenever the
            # garbage collector finds its generator: the core sees GeneratorExit at the point
            # where it stopped, on this task.
            try:
                outcome.close()
            except RuntimeError:
                log.exception("a cut request would not stop")
            self._stepped()

    def wake(self) -> None:
        """The host's state changed: every parked request looks again at what it waits for."""
        self._changed.set()
        self._changed = trio.Event()
