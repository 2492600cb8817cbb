"""``xenemu bench``: each section printed as it finishes, files that ``--compare`` and ``--plot``
read (``--out FILE.json``, ``--csv FILE.csv``), and ``--load`` to show or plot a saved run.

Everything ``--compare``, ``--plot`` and the output files need is checked before the benchmark
starts, so a typo costs a second, not a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from xenemu.cli.output import emit_json
from xenemu.cli.root import Refused, Usage, main


def writable(path: Path, what: str) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise Usage(f"{what} {path}: {parent} is not a directory")
    if path.is_dir():
        raise Usage(f"{what} {path} is a directory")


@main.command()
@click.option("--quick", is_flag=True, help="Small sizes: a smoke run, not figures to quote.")
@click.option(
    "--compare",
    "rev",
    default=None,
    metavar="REV|FILE.json",
    help="Also show another git revision's figures (run now) or a saved run's, side by side.",
)
@click.option("--out", "out_json", type=click.Path(path_type=Path), default=None, help="Write the figures as JSON.")
@click.option("--csv", "out_csv", type=click.Path(path_type=Path), default=None, help="Write figure,value rows.")
@click.option(
    "--plot", "out_plot", type=click.Path(path_type=Path), default=None, help="Draw the charts (needs [plot])."
)
@click.option(
    "--load",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Show (and --plot, --csv) a run saved with --out instead of running.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON on stdout (sections go to stderr).")
def bench(
    quick: bool,
    rev: str | None,
    out_json: Path | None,
    out_csv: Path | None,
    out_plot: Path | None,
    load: Path | None,
    as_json: bool,
) -> None:
    """Measure throughput, latency, scaling, memory, fairness and ballooning against an echo baseline."""
    from xenemu.bench.report import check_revision, load_json, side_by_side, table, write_csv, write_json

    for path, what in ((out_json, "--out"), (out_csv, "--csv"), (out_plot, "--plot")):
        if path is not None:
            writable(path, what)
    if out_plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise Usage("--plot needs matplotlib: pip install 'xenemu[plot]'") from None
    other: dict[str, Any] | None = None
    if rev is not None:
        try:
            other = load_json(Path(rev)) if rev.endswith(".json") and Path(rev).is_file() else None
            if other is None:
                check_revision(rev)
        except ValueError as exc:
            raise Usage(str(exc)) from None
    try:
        results = load_json(load) if load is not None else None
    except ValueError as exc:
        raise Usage(str(exc)) from None
    if results is None:
        from xenemu.bench import Scale, run_bench, section_lines

        def progress(name: str, so_far: dict[str, Any]) -> None:
            text = section_lines(name, so_far)
            if text:
                click.echo(text, err=as_json)
                (sys.stderr if as_json else sys.stdout).flush()

        results = run_bench(Scale.quick() if quick else Scale(), progress)
    elif not as_json:
        click.echo(table(results))
    if as_json:
        emit_json(results)
    if out_json is not None:
        write_json(results, out_json)
    if out_csv is not None:
        write_csv(results, out_csv)
    if out_plot is not None:
        from xenemu.bench.plot import PlotUnavailable, plot

        try:
            plot(results, out_plot)
        except PlotUnavailable as exc:
            raise Refused(str(exc)) from None
    if rev is not None:
        if other is None:
            from xenemu.bench.report import compare

            try:
                other = compare(rev, quick)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                raise Refused(str(exc)) from None
        click.echo(side_by_side(results, other, rev), err=as_json)
