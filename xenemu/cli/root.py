"""The ``xenemu`` group: ``--dir``, how a verb reaches the daemon, and how every failure becomes one line.

Exit codes are xl's habit made exact: 0 done, 1 the daemon refused (or could not be reached), 2 the
command line was wrong. Nothing here imports the core, the server or trio's world beyond the client;
each verb imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from xenemu import __version__

if TYPE_CHECKING:
    from xenemu.client import SyncControlClient

#: Exit codes (PROTOCOL.md / README "The toolstack and xl").
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
#: sun_path holds 108 bytes with its terminating NUL on Linux.
MAX_SOCKET_PATH = 107
SOCKET_NAMES = ("control.sock", "hypercall.sock")


def default_dir() -> Path:
    return Path(os.environ.get("XENEMU_DIR") or Path(tempfile.gettempdir()) / f"xenemu-{os.getuid()}")


class Refused(click.ClickException):
    """The daemon said no, or is not there: one line, exit 1."""

    exit_code = EXIT_REFUSED

    def show(self, file: Any = None) -> None:
        click.echo(f"xenemu: {self.format_message()}", err=True)


class Usage(click.UsageError):
    """A wrong command line that click's own checks cannot see: one line, exit 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"xenemu: {self.format_message()}", err=True)


class Group(click.Group):
    """The root group: any failure that escapes a verb is one line on stderr, never a traceback
    (``XENEMU_DEBUG=1`` re-raises, for whoever is debugging xenemu itself)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click's own main, except that a usage error is one line (with where to find help)."""
        kwargs["standalone_mode"] = False
        try:
            status = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare ``xenemu``: the help, as usage
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        except click.UsageError as exc:
            helpful = exc.ctx is not None and not isinstance(exc, Usage)  # click's own: where to look
            hint = f" (see '{exc.ctx.command_path} --help')" if helpful and exc.ctx else ""
            click.echo(f"xenemu: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("xenemu: aborted", err=True)
            sys.exit(EXIT_REFUSED)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        if isinstance(status, int) and status:  # ctx.exit(N) comes back as N without standalone_mode
            sys.exit(status)
        return status

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as exc:
            raise one_line(exc) from None


def one_line(exc: Exception) -> click.ClickException:
    """What a failure that escaped a verb says (the client's errors first: they may be OSErrors)."""
    client = sys.modules.get("xenemu.client")  # loaded if a verb reached the daemon
    if client is not None and isinstance(exc, client.XenError):
        return Refused(str(exc))
    if client is not None and isinstance(exc, client.ConnectionLost):
        return Refused(f"connection lost: {exc}")
    if os.environ.get("XENEMU_DEBUG"):
        raise exc
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return Refused(f"{exc.strerror or exc}{where}")
    return Refused(f"internal error: {type(exc).__name__}: {exc} (XENEMU_DEBUG=1 shows where)")


def check_dir(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """What is wrong with a ``--dir`` whatever the verb: not a directory, or too long a path for a socket."""
    longest = max(len(os.fsencode(value / name)) for name in SOCKET_NAMES)
    if longest > MAX_SOCKET_PATH:
        raise click.BadParameter(
            f"{str(value)[:60]}... is too long: a socket path in it would be {longest} bytes "
            f"(a Unix socket path holds {MAX_SOCKET_PATH})",
            ctx,
            param,
        )
    if value.exists() and not value.is_dir():
        raise click.BadParameter(f"{value} is not a directory", ctx, param)
    return value


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xenemu")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_dir,
    callback=check_dir,
    show_default="$XENEMU_DIR or /tmp/xenemu-$UID",
    help="Where the daemon's sockets live.",
)
@click.pass_context
def main(ctx: click.Context, directory: Path) -> None:
    """xenemu: an emulated Xen hypervisor serving the PV IOMMU hypercall ABI.

    The toolstack verbs follow Xen's xl: sizes in MiB, a domain by name or id, --json for programs.
    Exit status: 0 done, 1 refused by the daemon, 2 usage."""
    ctx.obj = directory


def control(directory: Path) -> SyncControlClient:
    """A connection to the daemon's control socket, or a one-line reason why not."""
    from xenemu.client import SyncControlClient

    path = directory / "control.sock"
    if not directory.is_dir():
        raise Refused(f"no xenemu daemon at {path}: {directory} does not exist (start one with 'xenemu serve')")
    try:
        return SyncControlClient.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Refused(f"no xenemu daemon at {path} (start one with 'xenemu serve')") from None
    except PermissionError:
        raise Refused(f"permission denied on {path} (the daemon's user may use it)") from None


def run_control(directory: Path, fn: Callable[[SyncControlClient], Any]) -> Any:
    """Run ``fn`` on a control connection; a refusal is ``Refused`` (exit 1)."""
    with control(directory) as ctl:
        return fn(ctl)


def fail(message: str) -> NoReturn:
    raise Refused(message)


def echo_err(message: str) -> None:
    click.echo(f"xenemu: {message}", err=True)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
