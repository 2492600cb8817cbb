"""``xenemu conformance``: the suite as a command (attached to ``xenemu``'s group in one line).

Only click is imported here; the suite loads when the command runs, so ``xenemu --help``
stays fast.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click


@click.command("conformance")
@click.argument("target", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-k",
    "patterns",
    multiple=True,
    metavar="EXPR",
    help="Rules by family, id, glob or substring (comma-separated; 'not X' or '-X' excludes).",
)
@click.option("--junit", "junit", type=click.Path(dir_okay=False, path_type=Path), help="Also write JUnit XML here.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write JSON here ('-': only JSON, on stdout).",
)
@click.option("--list", "list_rules", is_flag=True, help="List the rules and exit.")
@click.option("--self-test", is_flag=True, help="Run the suite against deliberately broken xenemu daemons.")
@click.option("--mutant", "mutants", multiple=True, metavar="NAME", help="With --self-test: only these mutants.")
@click.pass_obj
def conformance(
    directory: Path,
    target: tuple[Path, ...],
    patterns: tuple[str, ...],
    junit: Path | None,
    json_out: Path | None,
    list_rules: bool,
    self_test: bool,
    mutants: tuple[str, ...],
) -> None:
    """Check an implementation of the wire protocol against every rule of PROTOCOL.md.

    TARGET is a directory holding control.sock and hypercall.sock, or the two socket paths
    (control first); with none, --dir. The exit status is 1 if any rule failed, 2 if none
    could be checked, else 0."""
    from rich.console import Console

    from xenemu.conformance.cases import all_rules
    from xenemu.conformance.rules import select

    rules = select(all_rules(), patterns)
    console = Console(stderr=json_out == Path("-"))
    if not rules:
        raise click.UsageError(f"no rule matches {' '.join(patterns)!r}")
    if list_rules:
        for r in rules:
            click.echo(f"{r.id:28} §{r.section:5} {r.summary}")
        return
    if self_test:
        sys.exit(run_self_test(console, rules, mutants))
    sockets = resolve_target(directory, target)
    sys.exit(check_target(console, rules, sockets, junit, json_out))


def resolve_target(directory: Path, target: tuple[Path, ...]) -> Any:
    from xenemu.conformance.runner import Sockets

    if len(target) == 2:
        sockets = Sockets(target[0], target[1])
    elif len(target) <= 1:
        sockets = Sockets.in_dir(target[0] if target else directory)
    else:
        raise click.UsageError("TARGET is one directory or two socket paths")
    for path in (sockets.control, sockets.hypercall):
        if not path.exists():
            raise click.UsageError(f"no socket at {path}")
    return sockets


def check_target(console: Any, rules: list[Any], sockets: Any, junit: Path | None, json_out: Path | None) -> int:
    from xenemu.client import XenError
    from xenemu.conformance import report
    from xenemu.conformance.runner import exit_status, host_options, run

    try:
        options = host_options(sockets)
    except (OSError, XenError) as exc:
        raise click.ClickException(f"cannot reach {sockets.control}: {exc}") from None
    start = time.monotonic()
    with console.status(f"checking {len(rules)} rules") as status:
        results = run(rules, sockets, lambda r: status.update(f"checked {r.rule.id}"))
    seconds = time.monotonic() - start
    target = {"control": str(sockets.control), "hypercall": str(sockets.hypercall), "options": options}
    if json_out == Path("-"):
        import json

        click.echo(json.dumps(report.as_json(results, seconds, target), indent=2))
    else:
        console.print(report.table(results, f"conformance of {sockets.control.parent}"))
        console.print(report.summary(results, seconds))
        if json_out is not None:
            report.write_json(json_out, results, seconds, target)
    if junit is not None:
        report.write_junit(junit, results, seconds)
    return exit_status(results)


def run_self_test(console: Any, rules: list[Any], names: tuple[str, ...]) -> int:
    from rich.table import Table

    from xenemu.conformance.report import summary
    from xenemu.conformance.selftest import MUTANTS, self_test

    unknown = sorted(set(names) - set(MUTANTS))
    if unknown:
        raise click.UsageError(f"unknown mutant {unknown[0]!r}; known: {', '.join(MUTANTS)}")
    chosen = list(names or MUTANTS)
    start = time.monotonic()
    with console.status(f"the unbroken daemon and {len(chosen)} mutants") as status:
        baseline, outcomes = self_test(rules, chosen, lambda o: status.update(f"done: {o.mutant or 'xenemu'}"))
    grid = Table(title="self-test: which rule caught each mutation")
    for column in ("mutation", "what it breaks", "caught by"):
        grid.add_column(column)
    gaps = 0
    for outcome in outcomes:
        failed = outcome.failed
        if not failed:
            gaps += 1
        caught = ", ".join(failed[:4]) + (f" (+{len(failed) - 4} more)" if len(failed) > 4 else "")
        grid.add_row(outcome.mutant, MUTANTS[outcome.mutant], caught or "[bold red]nothing: a gap[/]")
    console.print(f"unbroken xenemu: {summary(baseline.results, 0).rsplit(' in ', 1)[0]}")
    for rule_id in baseline.failed:
        detail = next(r.detail for r in baseline.results if r.rule.id == rule_id)
        console.print(f"[bold red]  {rule_id} fails on the unbroken daemon:[/] {detail}")
    console.print(grid)
    console.print(f"{len(outcomes) - gaps} of {len(outcomes)} mutations caught in {time.monotonic() - start:.1f} s")
    return 1 if gaps or baseline.failed else 0
