"""``xenemu serve``: the host's options and the shell's limits as flags, then the daemon.

Only the option and limit defaults are read at import (``xenemu.core.options`` and
``xenemu.server.limits`` are dataclasses and nothing else); the daemon and the hypervisor are
imported when ``serve`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from xenemu.cli.params import NATURAL, POSITIVE
from xenemu.cli.root import EXIT_USAGE, echo_err, main
from xenemu.core.options import HostOptions
from xenemu.server.limits import Limits


def host_options(**kw: Any) -> HostOptions:
    return HostOptions(
        iommu=not kw["no_iommu"],
        dom0_strict=kw["dom0_strict"],
        dom0_passthrough=kw["dom0_passthrough"],
        max_order=kw["max_order"],
        nr_frames=kw["frames"],
        dom0_memory=kw["dom0_memory"],
        dom0_kind=kw["dom0_type"],
        max_ops_per_call=kw["max_ops"],
        continuation_every=kw["continuation_every"],
        fault_injection=kw["fault_injection"],
        fast_path=not kw.get("no_fast_path", False),
        max_mappings=kw.get("max_mappings", HostOptions().max_mappings),
        its_pits=kw["its_pits"],
        its_cpus=kw["its_cpus"],
        its_queue_slots=kw["its_queue_slots"],
        its_rate=kw["its_rate"],
        vits_batch_size=kw["vits_batch_size"],
        its_elision=kw["its_elision"],
    )


def host_option_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    defaults = HostOptions()
    flags = [
        click.option(
            "--frames", type=POSITIVE, default=defaults.nr_frames, show_default=True, help="Machine RAM in 4K frames."
        ),
        click.option(
            "--dom0-memory", type=POSITIVE, default=defaults.dom0_memory, show_default=True, help="dom0's frames."
        ),
        click.option("--dom0-type", type=click.Choice(["pv", "hvm"]), default="pv", show_default=True),
        click.option("--no-iommu", is_flag=True, help="A host without an IOMMU."),
        click.option("--dom0-strict", is_flag=True, help="dom0 may map only its own memory."),
        click.option("--dom0-passthrough", is_flag=True, help="dom0's devices see machine addresses."),
        click.option("--max-order", type=click.IntRange(0, 63), default=defaults.max_order, show_default=True),
        click.option("--max-ops", type=POSITIVE, default=defaults.max_ops_per_call, show_default=True),
        click.option("--continuation-every", type=POSITIVE, default=defaults.continuation_every, show_default=True),
        click.option("--fault-injection", is_flag=True, help="Allow inject-fault (tests)."),
        click.option(
            "--no-fast-path", is_flag=True, help="Run every op through the Python handlers (same results, slower)."
        ),
        click.option("--its-pits", type=POSITIVE, default=defaults.its_pits, show_default=True, help="Physical ITSs."),
        click.option("--its-cpus", type=POSITIVE, default=defaults.its_cpus, show_default=True, help="Physical CPUs."),
        click.option("--its-queue-slots", type=click.IntRange(4), default=defaults.its_queue_slots, show_default=True),
        click.option(
            "--its-rate",
            type=click.FloatRange(0, min_open=True),
            default=defaults.its_rate,
            show_default=True,
            help="Commands per second each pITS executes.",
        ),
        click.option("--vits-batch-size", type=POSITIVE, default=defaults.vits_batch_size, show_default=True),
        click.option(
            "--its-elision",
            type=click.Choice(["lazy", "eager", "off"]),
            default=defaults.its_elision,
            show_default=True,
        ),
    ]
    for flag in reversed(flags):
        fn = flag(fn)
    return fn


#: What each of the shell's limits is (PROTOCOL.md section 10); the flag is the field's name.
LIMIT_HELP = {
    "max_connections": "Hypercall connections that have said hello, in all.",
    "max_connections_per_domain": "Hypercall connections that have said hello, per domain.",
    "max_awaiting_hello": "Hypercall connections not yet past hello; a new one evicts the oldest.",
    "max_control_connections": "Control socket connections.",
    "hello_timeout": "Seconds a new connection has to say hello.",
    "send_timeout": "Seconds a peer has to take a frame sent to it.",
    "frame_timeout": "Seconds a frame begun after hello has to arrive whole.",
    "max_queued_events": "Events one connection may have waiting.",
    "shutdown_grace": "Seconds in-flight requests get at shutdown.",
}


def limit_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    defaults = Limits()
    for name in reversed(list(LIMIT_HELP)):
        default = getattr(defaults, name)
        kind = click.IntRange(1) if isinstance(default, int) else click.FloatRange(0, min_open=True)
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, type=kind, default=default, show_default=True, help=LIMIT_HELP[name])(fn)
    return fn


@main.command()
@host_option_flags
@click.option(
    "--max-mappings",
    type=NATURAL,
    default=HostOptions().max_mappings,
    show_default=True,
    help="Default quota of mappings per domain.",
)
@limit_flags
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of readable text.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.pass_obj
def serve(directory: Path, /, log_json: bool, log_level: str, **kw: Any) -> None:
    """Run the hypervisor: control.sock (toolstack) and hypercall.sock (guests) in --dir
    (created 0700; an existing one must be this user's, writable by nobody else, not in use)."""
    import trio

    from xenemu.logs import configure

    configure(json=log_json, level=log_level)
    limits = Limits(**{name: kw.pop(name) for name in LIMIT_HELP})
    try:
        options = host_options(**kw)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from xenemu.server.admission import StateDir, StateDirError

    try:
        state = StateDir(directory)
    except StateDirError as exc:
        echo_err(str(exc))
        raise SystemExit(EXIT_USAGE) from None
    except OSError as exc:  # cannot be created, or not reached: the parent is missing or not ours
        echo_err(f"cannot use --dir {directory}: {exc.strerror or exc}")
        raise SystemExit(EXIT_USAGE) from None
    from xenemu.core.host import Host
    from xenemu.server.daemon import Daemon, freeze_startup_objects, run_daemon

    async def started(daemon: Daemon) -> None:
        freeze_startup_objects()  # the started daemon's own objects: out of full collections

    try:
        trio.run(lambda: run_daemon(Host(options), directory, limits=limits, state=state, started=started))
    finally:
        state.close()
