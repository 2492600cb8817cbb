"""``xenemu save DOMID FILE`` and ``xenemu restore FILE``, as ``xl save`` and ``xl restore``.
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

if TYPE_CHECKING:
    from xenemu.client import SyncControlClient


def _run(directory: Path, fn: Callable[[SyncControlClient], Any]) -> Any:
    from xenemu.client import ConnectionLost, SyncControlClient, XenError

    path = directory / "control.sock"
    try:
        with SyncControlClient.connect(path) as ctl:
            return fn(ctl)
    except (FileNotFoundError, ConnectionRefusedError):
        raise click.ClickException(f"no xenemu daemon at {path} (start one with 'xenemu serve')") from None
    except XenError as exc:
        raise click.ClickException(str(exc)) from None
    except ConnectionLost as exc:
        raise click.ClickException(f"connection lost: {exc}") from None


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


@click.command("save")
@click.argument("domid", type=int)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-c", "--keep", is_flag=True, help="Leave the domain running after the save (xl save -c).")
@click.option(
    "--with-dm", is_flag=True, help="Save its device-model domains with it (their images follow the guest's)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def save(directory: Path, domid: int, file: Path, keep: bool, with_dm: bool, as_json: bool) -> None:
    """Save a domain's whole state to FILE, then destroy it (as xl save)."""

    def work(ctl: SyncControlClient) -> bytes:
        with _bar("saving", as_json) as bar:
            task = bar.add_task("save", total=None)
            return ctl.save_image(domid, keep, lambda n: bar.update(task, advance=n), with_dm=with_dm)

    data = _run(directory, work)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, file)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise click.ClickException(f"cannot write {file}: {exc.strerror}") from None
    from xenemu.client.transport import split_images

    models = len(split_images(data)) - 1
    if as_json:
        result: dict[str, Any] = {"domid": domid, "file": str(file), "bytes": len(data), "kept": keep}
        click.echo(json.dumps(result | ({"device_models": models} if with_dm else {})))
    else:
        also = f" with {models} device model{'s' if models > 1 else ''}" if with_dm else ""
        gone = "" if keep else f"; {'they are' if with_dm else 'the domain is'} destroyed"
        click.echo(f"saved d{domid}{also} to {file} ({len(data)} bytes){gone}")


@click.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@click.pass_obj
def restore(directory: Path, file: Path, as_json: bool) -> None:
    """Restore a domain saved with 'xenemu save': a new domid and token (as xl restore)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror}") from None

    def work(ctl: SyncControlClient) -> Any:
        with _bar("restoring", as_json) as bar:
            task = bar.add_task("restore", total=len(data))
            return ctl.restore_image(data, lambda n: bar.update(task, advance=n))

    reply = _run(directory, work)
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
