"""``xenemu``: the daemon (``serve``), toolstack verbs after Xen's ``xl``, and a demo.

People get tables; ``--json`` gives programs the daemon's own replies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio
from rich.console import Console
from rich.table import Table

from xenemu import __version__, programs_dir
from xenemu.cli_migration import restore, save
from xenemu.client import ConnectionLost, SyncControlClient, XenError
from xenemu.core.options import HostOptions
from xenemu.logs import configure
from xenemu.server.limits import Limits


def console() -> Console:
    """A console sized to the terminal as it is now (COLUMNS is honoured)."""
    return Console()


class BasedInt(click.ParamType[int]):
    """An integer in any base Python reads: 4096, 0x1000, 0o10000."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return int(value, 0)
        except ValueError:
            self.fail(f"{value!r} is not an integer", param, ctx)


BASED_INT = BasedInt()


def default_dir() -> Path:
    return Path(os.environ.get("XENEMU_DIR") or Path(tempfile.gettempdir()) / f"xenemu-{os.getuid()}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xenemu")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_dir,
    show_default="$XENEMU_DIR or /tmp/xenemu-$UID",
    help="Where the daemon's sockets live.",
)
@click.pass_context
def main(ctx: click.Context, directory: Path) -> None:
    """xenemu: an emulated Xen hypervisor serving the PV IOMMU hypercall ABI."""
    ctx.obj = directory


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
            "--frames", type=int, default=defaults.nr_frames, show_default=True, help="Machine RAM in 4K frames."
        ),
        click.option("--dom0-memory", type=int, default=defaults.dom0_memory, show_default=True, help="dom0's frames."),
        click.option("--dom0-type", type=click.Choice(["pv", "hvm"]), default="pv", show_default=True),
        click.option("--no-iommu", is_flag=True, help="A host without an IOMMU."),
        click.option("--dom0-strict", is_flag=True, help="dom0 may map only its own memory."),
        click.option("--dom0-passthrough", is_flag=True, help="dom0's devices see machine addresses."),
        click.option("--max-order", type=int, default=defaults.max_order, show_default=True),
        click.option("--max-ops", type=int, default=defaults.max_ops_per_call, show_default=True),
        click.option("--continuation-every", type=int, default=defaults.continuation_every, show_default=True),
        click.option("--fault-injection", is_flag=True, help="Allow inject-fault (tests)."),
        click.option(
            "--no-fast-path", is_flag=True, help="Run every op through the Python handlers (same results, slower)."
        ),
        click.option("--its-pits", type=int, default=defaults.its_pits, show_default=True, help="Physical ITSs."),
        click.option("--its-cpus", type=int, default=defaults.its_cpus, show_default=True, help="Physical CPUs."),
        click.option("--its-queue-slots", type=int, default=defaults.its_queue_slots, show_default=True),
        click.option(
            "--its-rate",
            type=float,
            default=defaults.its_rate,
            show_default=True,
            help="Commands per second each pITS executes.",
        ),
        click.option("--vits-batch-size", type=int, default=defaults.vits_batch_size, show_default=True),
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
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, type=type(default), default=default, show_default=True, help=LIMIT_HELP[name])(fn)
    return fn


@main.command()
@host_option_flags
@click.option(
    "--max-mappings",
    type=int,
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
        click.echo(f"xenemu: {exc}", err=True)
        sys.exit(2)
    from xenemu.core.host import Host
    from xenemu.server.daemon import run_daemon

    try:
        trio.run(lambda: run_daemon(Host(options), directory, limits=limits, state=state))
    finally:
        state.close()


# -- toolstack verbs ----------------------------------------------------------------------------------
def control(directory: Path) -> SyncControlClient:
    path = directory / "control.sock"
    try:
        return SyncControlClient.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise click.ClickException(f"no xenemu daemon at {path} (start one with 'xenemu serve')") from None


def run_control(directory: Path, fn: Callable[[SyncControlClient], Any]) -> Any:
    try:
        with control(directory) as ctl:
            return fn(ctl)
    except XenError as exc:
        raise click.ClickException(str(exc)) from None
    except ConnectionLost as exc:
        raise click.ClickException(f"connection lost: {exc}") from None


json_flag = click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")


def print_pairs(heading: str, pairs: dict[str, Any]) -> None:
    """A two-column table of names and values, for a person."""
    table = Table(heading, "Value")
    for key, value in pairs.items():
        table.add_row(key, str(value))
    console().print(table)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))


@main.command()
@click.option("--type", "kind", type=click.Choice(["pv", "hvm"]), default="hvm", show_default=True)
@click.option("--memory", type=int, default=256, show_default=True, help="Memory in 4K frames.")
@click.option("--target", type=int, default=None, help="Make it a device model for this domain.")
@click.option("--name", default="", help="A name to show in 'list'.")
@click.option("--max-mappings", type=int, default=None, help="Its quota of mappings (default: the host's).")
@json_flag
@click.pass_obj
def create(
    directory: Path, kind: str, memory: int, target: int | None, name: str, max_mappings: int | None, as_json: bool
) -> None:
    """Create a domain; prints its id and the token its programs connect with."""
    reply = run_control(directory, lambda c: c.create_domain(kind, memory, target, name, max_mappings))
    if as_json:
        emit_json({"domid": reply["domid"], "token": reply["token"]})
    else:
        click.echo(f"domid {reply['domid']} token {reply['token']}")


@main.command()
@click.argument("domid", type=int)
@click.pass_obj
def destroy(directory: Path, domid: int) -> None:
    """Destroy a domain, releasing everything it holds."""
    run_control(directory, lambda c: c.destroy_domain(domid))


@main.command("list")
@json_flag
@click.pass_obj
def list_(directory: Path, as_json: bool) -> None:
    """List domains."""
    domains = run_control(directory, lambda c: c.list_domains())
    if as_json:
        emit_json(domains)
        return
    table = Table("ID", "Name", "Type", "Frames", "Target", "Devices", "map_cap", "Flushes a/m", "M2B", "Faults")
    for d in domains:
        flushes = d["flushes"]
        table.add_row(
            str(d["domid"]),
            d["name"],
            d["type"] + (" (hw)" if d["hwdom"] else ""),
            str(d["pages"]),
            "" if d["target"] is None else str(d["target"]),
            " ".join(d["devices"]),
            "yes" if d["map_cap"] else "no",
            f"{flushes.get('added', 0)}/{flushes.get('modified', 0)}" if flushes else "",
            str(d["m2b_entries"]),
            str(d["dma_faults"]),
        )
    console().print(table)


def parse_rmrr(value: str) -> tuple[int, int]:
    start, _, count = value.partition(":")
    try:
        return int(start, 0), int(count or "1", 0)
    except ValueError:
        raise click.BadParameter(f"{value!r}: want START[:COUNT] in frames") from None


@main.command("pci-attach")
@click.argument("domid", type=int)
@click.argument("bdf")
@click.option("--rmrr", multiple=True, help="Reserved region START[:COUNT] (frames), identity-mapped.")
@click.pass_obj
def pci_attach(directory: Path, domid: int, bdf: str, rmrr: tuple[str, ...]) -> None:
    """Assign a PCI device (SSSS:BB:DD.F) to a domain."""
    regions = [parse_rmrr(r) for r in rmrr]
    run_control(directory, lambda c: c.assign_device(domid, bdf, regions))


@main.command()
@click.argument("domid", type=int)
@click.pass_obj
def token(directory: Path, domid: int) -> None:
    """Print the token a program uses to speak for DOMID."""
    click.echo(run_control(directory, lambda c: c.domain_token(domid)))


@main.command()
@json_flag
@click.pass_obj
def stats(directory: Path, as_json: bool) -> None:
    """Host-wide counters."""
    reply = run_control(directory, lambda c: c.stats())
    reply.pop("ret", None)
    reply.pop("id", None)
    if as_json:
        emit_json(reply)
        return
    print_pairs("Counter", reply)


@main.command()
@json_flag
@click.pass_obj
def audit(directory: Path, as_json: bool) -> None:
    """Check every invariant; exits 1 if any is violated."""
    violations = run_control(directory, lambda c: c.audit())
    if as_json:
        emit_json({"violations": violations})
    elif violations:
        for line in violations:
            console().print(f"[red]violation[/red] {line}")
    else:
        console().print("[green]audit clean[/green]")
    if violations:
        sys.exit(1)


@main.command()
@click.argument("domid", type=int)
@click.option("--start", type=BASED_INT, default=0, help="First BFN.")
@click.option("--limit", type=int, default=64, show_default=True)
@json_flag
@click.pass_obj
def mappings(directory: Path, domid: int, start: int, limit: int, as_json: bool) -> None:
    """A domain's IOMMU mappings (BFN -> MFN)."""
    rows = run_control(directory, lambda c: c.dump_mappings(domid, start, limit))
    if as_json:
        emit_json(rows)
        return
    table = Table("BFN", "MFN", "Perms", "Kind", title=f"d{domid} IOMMU mappings")
    for row in rows:
        table.add_row(f"{row['bfn']:#x}", f"{row['mfn']:#x}", row["perms"], row["kind"])
    console().print(table)


@main.command()
@json_flag
@click.pass_obj
def info(directory: Path, as_json: bool) -> None:
    """The host's options."""
    reply = run_control(directory, lambda c: c.host_info())
    if as_json:
        emit_json(reply["options"])
        return
    print_pairs("Option", reply["options"])


@main.command("its")
@click.argument("domid", type=int, required=False)
@json_flag
@click.pass_obj
def its(directory: Path, domid: int | None, as_json: bool) -> None:
    """The ITS: per pITS counters, or a domain's vITS frames, devices and counters."""
    reply = run_control(directory, lambda c: c.its_stats() if domid is None else c.its_info(domid))
    reply.pop("id", None)
    reply.pop("ret", None)
    if as_json:
        emit_json(reply)
        return
    if domid is None:
        table = Table("pITS", "Passes", "Batches", "Xen INTs", "Queued", "Physical commands", "HW errors")
        for p in reply["pits"]:
            table.add_row(
                str(p["index"]),
                str(p["passes"]),
                str(p["batches"]),
                str(p["xen_ints"]),
                str(p["queued"]),
                " ".join(f"{k}={v}" for k, v in sorted(p["physical"].items())),
                " ".join(f"{k}={v}" for k, v in sorted(p["hardware_errors"].items())),
            )
        console().print(table)
        return
    table = Table("vITS", "Frame", "Received", "Forwarded", "Elided", "Dropped", "Longest wait", title=f"d{domid}")
    for pits, counters in reply["vits"].items():
        table.add_row(
            pits,
            f"{int(reply['its_frames'][pits]):#x}",
            *(
                " ".join(f"{k}={v}" for k, v in sorted(counters[n].items()))
                for n in ("received", "forwarded", "elided", "dropped")
            ),
            str(counters["longest_wait_passes"]),
        )
    console().print(table)
    for device in reply["devices"]:
        console().print(
            f"{device['bdf']}: DeviceID {device['devid']:#x} -> virtual {device['vdevid']}, "
            f"{device['events']} events, pITS {device['pits']}"
        )


@main.command("inject-fault")
@click.argument("domid", type=int)
@click.argument("bfn", type=BASED_INT)
@click.option("--clear", is_flag=True)
@click.pass_obj
def inject_fault(directory: Path, domid: int, bfn: int, clear: bool) -> None:
    """Make IOMMU writes at BFN of DOMID fail with -EIO (needs --fault-injection)."""
    run_control(directory, lambda c: c.inject_fault(domid, bfn, clear))


# -- benchmark ----------------------------------------------------------------------------------------
@main.command()
@click.option("--quick", is_flag=True, help="Small sizes: a smoke run, not figures to quote.")
@click.option("--compare", "rev", default=None, help="Also run the benchmark of this git revision, side by side.")
@json_flag
def bench(quick: bool, rev: str | None, as_json: bool) -> None:
    """Measure throughput, latency, scaling, memory, fairness and ballooning against an echo baseline."""
    from xenemu.bench import Scale, compare, run_bench, side_by_side, table

    results = run_bench(Scale.quick() if quick else Scale())
    if as_json:
        emit_json(results)
    else:
        click.echo(table(results))
    if rev:
        click.echo(side_by_side(results, compare(rev, quick), rev))


# -- demo ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--memory", type=int, default=1024, show_default=True, help="The guest's frames.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="warning")
def demo(memory: int, log_level: str) -> None:
    """Start a daemon, create dom0 plus an HVM guest with a device, and run the guest program."""
    configure(level=log_level)
    guest_program = programs_dir() / "pv_iommu_guest.py"
    if not guest_program.is_file():
        raise click.ClickException(f"{guest_program} not found (a broken install: reinstall xenemu)")

    async def scenario(directory: Path) -> int:
        from xenemu.client import ControlClient
        from xenemu.core.host import Host
        from xenemu.server.daemon import run_daemon

        status = 1

        async def started(daemon: Any) -> None:
            nonlocal status
            async with await ControlClient.connect(directory / "control.sock") as ctl:
                await ctl.assign_device(0, "0000:00:02.0")
                guest = await ctl.create_domain("hvm", memory, name="demo-guest")
                await ctl.assign_device(guest["domid"], "0000:00:03.0")
                console().print(f"[bold]guest d{guest['domid']}[/bold]: HVM, {memory} frames, device 0000:00:03.0")
                argv = [
                    sys.executable,
                    str(guest_program),
                    "--socket",
                    str(directory / "hypercall.sock"),
                    "--token",
                    guest["token"],
                    "--bdf",
                    "0000:00:03.0",
                ]
                proc = await trio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
                violations = await ctl.audit()
                for line in violations:
                    console().print(f"[red]violation[/red] {line}")
                console().print("[green]audit clean[/green]" if not violations else "[red]audit failed[/red]")
                status = 0 if proc.returncode == 0 and not violations else 1
            daemon.shutdown()

        await run_daemon(Host(HostOptions(nr_frames=max(1 << 16, memory * 2 + 8192))), directory, started=started)
        return status

    with tempfile.TemporaryDirectory(prefix="xenemu-demo-") as tmp:
        sys.exit(trio.run(scenario, Path(tmp)))


main.add_command(__import__("xenemu.conformance.cli", fromlist=["conformance"]).conformance)
main.add_command(save)
main.add_command(restore)
if __name__ == "__main__":
    main()
