"""``xenemu save DOMAIN FILE``, ``xenemu restore FILE`` and ``xenemu migrate DOMAIN --to DIR``, as
``xl save``, ``xl restore`` and ``xl migrate``.
With ``--with-dm`` the file holds the guest's image and then each of its device models'; a
restore builds them all, and prints each device model's new domid, token and server ids.

The daemon makes and checks the image; these verbs carry it between the control socket and a
file (``SyncControlClient.save_image``/``restore_image``, in 1 MiB chunks: a frame holds at most
4 MiB), with a progress bar for a person and ``--json`` for a program. The file is written
beside its final name and renamed into place, so an interrupted save never leaves a partial
image under that name.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from xenemu.cli.params import DOMAIN, resolve
from xenemu.cli.root import Refused, Usage, control, main, run_control

if TYPE_CHECKING:
    from xenemu.client import SyncControlClient


def _run(directory: Path, ref: int | str | None, fn: Callable[[SyncControlClient, int], Any]) -> Any:
    """``fn`` on a control connection, with the domain ``ref`` names (by id or name, as xl)."""

    def work(ctl: SyncControlClient) -> Any:
        return fn(ctl, resolve(ctl, ref) if ref is not None else 0)

    return run_control(directory, work)


def _bar(label: str, quiet: bool) -> Any:
    """A transfer's progress bar on stderr, only where a person watches (never with --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        disable=quiet or not sys.stderr.isatty(),
        transient=True,
    )


@main.command("save")
@click.argument("domain", type=DOMAIN)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-c", "--keep", is_flag=True, help="Leave the domain running after the save (xl save -c).")
@click.option(
    "--with-dm", is_flag=True, help="Save its device-model domains with it (their images follow the guest's)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def save(directory: Path, domain: int | str, file: Path, keep: bool, with_dm: bool, as_json: bool) -> None:
    """Save a domain's whole state to FILE, then destroy it (as xl save)."""

    def work(ctl: SyncControlClient, domid: int) -> tuple[int, bytes]:
        with _bar("saving", as_json) as bar:
            task = bar.add_task("save", total=None)
            return domid, ctl.save_image(domid, keep, lambda n: bar.update(task, advance=n), with_dm=with_dm)

    domid, data = _run(directory, domain, work)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, file)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise Refused(f"cannot write {file}: {exc.strerror}") from None
    from xenemu.client.transport import split_images

    models = len(split_images(data)) - 1
    if as_json:
        result: dict[str, Any] = {"domid": domid, "file": str(file), "bytes": len(data), "kept": keep}
        click.echo(json.dumps(result | ({"device_models": models} if with_dm else {})))
    else:
        also = f" with {models} device model{'s' if models > 1 else ''}" if with_dm else ""
        gone = "" if keep else f"; {'they are' if with_dm else 'the domain is'} destroyed"
        click.echo(f"saved d{domid}{also} to {file} ({len(data)} bytes){gone}")


@main.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@click.pass_obj
def restore(directory: Path, file: Path, as_json: bool) -> None:
    """Restore a domain saved with 'xenemu save': a new domid and token (as xl restore)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise Refused(f"cannot read {file}: {exc.strerror}") from None

    def work(ctl: SyncControlClient, _: int) -> Any:
        with _bar("restoring", as_json) as bar:
            task = bar.add_task("restore", total=len(data))
            return ctl.restore_image(data, lambda n: bar.update(task, advance=n))

    reply = _run(directory, None, work)
    models = reply.get("device_models")
    if as_json:
        out = {k: reply[k] for k in ("domid", "token", "pages")}
        click.echo(json.dumps(out | ({"device_models": models} if models is not None else {})))
    else:
        click.echo(f"domid {reply['domid']} token {reply['token']} ({reply['pages']} pages)")
        for model in models or []:
            ids = ", ".join(f"{old} -> {new}" for old, new in model["servers"])
            click.echo(
                f"device model domid {model['domid']} token {model['token']} ({model['pages']} pages);"
                f" IOREQ servers {ids or 'none'}"
            )


@main.command("migrate")
@click.argument("domain", type=DOMAIN)
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The receiving daemon's state directory (its control.sock).",
)
@click.option("--downtime", default=30.0, show_default=True, help="Longest stop to aim for, in ms.")
@click.option("--max-rounds", default=30, show_default=True, help="Pre-copy rounds before the domain is stopped.")
@click.option("--with-dm", is_flag=True, help="Its device-model domains go with it (stopped and copied at the stop).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def migrate(
    directory: Path, domain: int | str, target: Path, downtime: float, max_rounds: int, with_dm: bool, as_json: bool
) -> None:
    """Live-migrate a domain to another daemon (as xl migrate): pre-copy, then stop-and-copy.

    The domain keeps its token: its programs reconnect to the receiver's hypercall.sock with it."""
    from xenemu.client.migration import MigrationFailed, Policy, Report
    from xenemu.client.migration import migrate as run_migration

    if downtime <= 0 or max_rounds < 1:
        raise Usage("--downtime must be positive and --max-rounds at least 1")

    def work(ctl: SyncControlClient, domid: int) -> tuple[int, Report]:
        with control(target) as dst, _bar("migrating", as_json) as bar:
            task = bar.add_task("migrate", total=None)

            def progress(report: Report, reply: dict[str, Any]) -> None:
                bar.update(task, completed=report.pages_sent * 4096, description=f"round {report.rounds}")

            try:
                return domid, run_migration(ctl, dst, domid, Policy(downtime / 1000, max_rounds), progress, with_dm)
            except MigrationFailed as exc:
                raise Refused(f"migration of d{domid} failed: {exc}") from None

    domid, report = _run(directory, domain, work)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"d{domid} migrated to {target} as d{report.new_domid}", title_justify="left")
    for column in ("Round", "Pages sent", "Seconds", "Dirtied meanwhile", "Dirty rate (pages/s)"):
        table.add_column(column, justify="right")
    for rnd, sent, took, dirtied in report.history:
        table.add_row(str(rnd), f"{sent:,}", f"{took:.3f}", f"{dirtied:,}", f"{dirtied / max(took, 1e-6):,.0f}")
    table.add_row(f"{report.rounds} (stopped)", f"{report.final_pages:,}", f"{report.downtime_ms / 1000:.3f}", "", "")
    Console().print(table)
    click.echo(
        f"rounds {report.rounds}, pages sent {report.pages_sent} of {report.pages}"
        f" ({report.pages_sent / max(report.pages, 1):.2f}x, {report.bytes_sent / (1 << 20):.1f} MiB),"
        f" dirty rate {report.dirty_rate:,.0f} pages/s, last section {report.final_pages} pages,"
        f" downtime {report.downtime_ms:.1f} ms, total {report.total_s:.2f} s"
    )
    click.echo(f"the domain keeps its token; it runs on {target} as d{report.new_domid}")
    for model in report.device_models:
        servers = ", ".join(f"{old}->{new}" for old, new in model["servers"])
        click.echo(f"its device model runs there as d{model['domid']} (same token), IOREQ servers {servers}")
