"""One input through the whole request path, in-process: frame decoder, typed parse, dispatch.

Shared by the hypothesis tests and the atheris campaign (fuzz/atheris_wire.py), so both check
the same property: whatever the bytes, the only outcomes are a message, a WireError, or a
HypercallError, and the host's audit stays clean.
"""

from __future__ import annotations

from typing import Any

from xenemu.core.actions.dispatch import dispatch, parse
from xenemu.core.audit import audit
from xenemu.core.errors import HypercallError
from xenemu.core.host import Host
from xenemu.core.options import HostOptions
from xenemu.wire import FrameDecoder, WireError


def fuzz_host() -> Host:
    """A small host with a guest, an emulator for it (with a device) and an IOREQ server."""
    host = Host(HostOptions(nr_frames=1024, dom0_memory=64, max_ops_per_call=64, fault_injection=True))
    guest = host.create_domain("hvm", 32)
    host.assign_device(guest.domid, "00:03.0")
    dm = host.create_domain("pv", 8, target=guest.domid)
    host.assign_device(dm.domid, "00:05.0")
    host.emulators.create_server(dm.domid, guest.domid)
    return host


def feed(host: Host, data: bytes, callers: tuple[int, ...] = (1, 2)) -> list[Any]:
    """Run every frame in ``data`` as a hypercall from each caller in turn; returns the outcomes."""
    decoder = FrameDecoder()
    decoder.feed(data)
    outcomes: list[Any] = []
    for n in range(64):
        message = decoder.next()
        if message is None:
            break
        if isinstance(message, WireError):
            outcomes.append(message)
            if message.fatal:
                break
            continue
        caller = callers[n % len(callers)]
        try:
            action = parse(message.get("op"), message.get("args", {}), "hypercall")
            gen = dispatch(host, caller, action)
            while True:
                try:
                    next(gen)  # continuation points and waits: never answered here
                except StopIteration as stop:
                    outcomes.append(stop.value)
                    break
                if host.ioreq.servers:
                    for server in host.ioreq.servers.values():
                        for req_id in list(server.pending):
                            server.complete(req_id)
        except HypercallError as exc:
            outcomes.append(exc)
        host.iommu.flush_touched()
    problems = audit(host)
    if problems:
        raise AssertionError(problems)
    return outcomes
