"""Host verbs: ``info`` (as ``xl info``: memory, IOMMU, options), ``stats``, ``audit``, and
``dmesg`` (the daemon's recent log lines, from its bounded ring)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import click

from xenemu import __version__
from xenemu.cli.domains import json_flag, mib
from xenemu.cli.output import emit_json, say, show_pairs
from xenemu.cli.params import BasedInt
from xenemu.cli.root import main, run_control


def host_report(ctl: Any) -> dict[str, Any]:
    """``xl info``'s keys that mean something here, then every host option."""
    info = ctl.host_info()
    stats = ctl.stats()
    options = info["options"]
    report = {
        "host": socket.gethostname(),
        "xenemu_version": __version__,
        "nr_cpus": options.get("its_cpus"),
        "total_memory": mib(stats["frames"]),
        "free_memory": mib(stats["free_frames"]),
        "nr_frames": stats["frames"],
        "free_frames": stats["free_frames"],
        "nr_domains": stats["domains"],
        "iommu": "enabled" if options.get("iommu") else "disabled",
        "fast_path": "on" if info.get("fast_path") else "off",
    }
    return report | {k: v for k, v in options.items() if k not in report and k not in ("iommu", "fast_path")}


@main.command()
@json_flag
@click.pass_obj
def info(directory: Path, as_json: bool) -> None:
    """The host as xl info reports it: total and free memory (MiB), CPUs, the IOMMU, its options."""
    report = run_control(directory, host_report)
    if as_json:
        emit_json(report)
    else:
        show_pairs(report)


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
    else:
        show_pairs(reply)


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
            say(f"violation {line}", "red")
    else:
        say("audit clean", "green")
    if violations:
        raise SystemExit(1)


@main.command()
@click.option("--lines", "-n", type=BasedInt(1, 1000), default=1000, help="At most the last N lines.")
@json_flag
@click.pass_obj
def dmesg(directory: Path, lines: int, as_json: bool) -> None:
    """The daemon's recent log, oldest first (its last 1,000 lines at most, each clipped)."""
    got = run_control(directory, lambda c: c.dmesg(lines))
    got.pop("id", None)
    got.pop("ret", None)
    if as_json:
        emit_json(got)
        return
    for line in got["lines"]:
        click.echo(line)
