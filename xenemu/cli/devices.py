"""Device verbs: ``pci-attach`` (with an ITS DeviceID for an MSI-capable device), ``mappings``
(a domain's IOMMU entries), ``its`` (the pITSs, or a domain's vITS) and ``inject-fault``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xenemu.cli.domains import json_flag
from xenemu.cli.output import emit_json, show_table
from xenemu.cli.params import BASED_INT, BDF, DOMAIN, NATURAL, BasedInt, resolve
from xenemu.cli.root import main, run_control

#: The most rows ``mappings`` asks for at once (a reply stays a few MiB at most).
MAX_DUMP = 65536


def rmrr_region(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[int, int]]:
    from xenemu.cli.xlcfg import parse_rmrr

    try:
        return [parse_rmrr(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@main.command("pci-attach")
@click.argument("domain", type=DOMAIN)
@click.argument("bdf", type=BDF)
@click.option(
    "--rmrr", multiple=True, callback=rmrr_region, help="Reserved region START[:COUNT] (frames), identity-mapped."
)
@click.option("--its-devid", type=BasedInt(0, 2**32 - 1), default=None, help="MSI-capable: its ITS DeviceID.")
@click.option("--its-events", type=NATURAL, default=0, show_default=True, help="MSI-capable: its number of events.")
@click.option(
    "--pits", type=NATURAL, default=0, show_default=True, help="MSI-capable: the physical ITS it sits behind."
)
@json_flag
@click.pass_obj
def pci_attach(
    directory: Path,
    domain: int | str,
    bdf: str,
    rmrr: list[tuple[int, int]],
    its_devid: int | None,
    its_events: int,
    pits: int,
    as_json: bool,
) -> None:
    """Assign a PCI device ([SSSS:]BB:DD.F) to a domain; with --its-devid it raises MSIs through
    the vITS, and the reply's vdevid is the DeviceID the guest sees."""
    if its_devid is None and (its_events or pits):
        raise click.UsageError("--its-events and --pits need --its-devid")

    def run(ctl: Any) -> dict[str, Any]:
        domid = resolve(ctl, domain)
        reply = ctl.assign_device(domid, bdf, rmrr, its_devid, its_events, pits)
        return {"domid": domid, **{k: v for k, v in reply.items() if k not in ("id", "ret")}}

    reply = run_control(directory, run)
    if as_json:
        emit_json(reply)
    elif "vdevid" in reply:
        click.echo(f"{reply['bdf']} -> d{reply['domid']}, virtual DeviceID {reply['vdevid']}")


@main.command()
@click.argument("domain", type=DOMAIN)
@click.option("--start", type=NATURAL, default=0, help="First BFN (any base).")
@click.option("--limit", type=BasedInt(1, MAX_DUMP), default=64, show_default=True, help="At most this many rows.")
@json_flag
@click.pass_obj
def mappings(directory: Path, domain: int | str, start: int, limit: int, as_json: bool) -> None:
    """A domain's IOMMU mappings (BFN -> MFN)."""
    domid, rows = run_control(directory, lambda c: (d := resolve(c, domain), c.dump_mappings(d, start, limit)))
    if as_json:
        emit_json(rows)
        return
    table = [[f"{r['bfn']:#x}", f"{r['mfn']:#x}", r["perms"], r["kind"]] for r in rows]
    show_table(["BFN", "MFN", "Perms", "Kind"], table, title=f"d{domid} IOMMU mappings")


def counters(values: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(values.items()))


@main.command("its")
@click.argument("domain", type=DOMAIN, required=False)
@json_flag
@click.pass_obj
def its(directory: Path, domain: int | str | None, as_json: bool) -> None:
    """The ITS: per pITS counters, or a domain's vITS frames, devices and counters."""
    reply = run_control(directory, lambda c: c.its_stats() if domain is None else c.its_info(resolve(c, domain)))
    reply.pop("id", None)
    reply.pop("ret", None)
    if as_json:
        emit_json(reply)
        return
    if domain is None:
        rows = [
            [
                str(p["index"]),
                str(p["passes"]),
                str(p["batches"]),
                str(p["xen_ints"]),
                str(p["queued"]),
                counters(p["physical"]),
                counters(p["hardware_errors"]),
            ]
            for p in reply["pits"]
        ]
        show_table(["pITS", "Passes", "Batches", "Xen INTs", "Queued", "Physical commands", "HW errors"], rows)
        return
    rows = [
        [
            pits,
            f"{int(reply['its_frames'][pits]):#x}",
            *(counters(c[n]) for n in ("received", "forwarded", "elided", "dropped")),
            str(c["longest_wait_passes"]),
        ]
        for pits, c in reply["vits"].items()
    ]
    show_table(["vITS", "Frame", "Received", "Forwarded", "Elided", "Dropped", "Longest wait"], rows, title=str(domain))
    for device in reply["devices"]:
        click.echo(
            f"{device['bdf']}: DeviceID {device['devid']:#x} -> virtual {device['vdevid']}, "
            f"{device['events']} events, pITS {device['pits']}"
        )


@main.command("inject-fault")
@click.argument("domain", type=DOMAIN)
@click.argument("bfn", type=BASED_INT)
@click.option("--clear", is_flag=True)
@click.pass_obj
def inject_fault(directory: Path, domain: int | str, bfn: int, clear: bool) -> None:
    """Make IOMMU writes at BFN of DOMAIN fail with -EIO (needs serve --fault-injection)."""
    run_control(directory, lambda c: c.inject_fault(resolve(c, domain), bfn, clear))
