"""How a verb shows what it read: a table for a person at a terminal, plain whitespace columns
when piped, JSON for programs. A field is never cut to ``…``: piped output keeps every field
whole, one row a line, empty fields written ``-`` so that ``awk`` counts the same columns on
every line; at a terminal a boxed table is drawn when it fits the width as it is, and the plain
columns otherwise (the terminal wraps a long line; a squeezed box would fold every cell)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns separated by at least two spaces, every cell whole (a cell's spaces become ``,``)."""
    cells = [[(c.replace(" ", ",") if c else "-") for c in row] for row in rows]
    heads = [h.replace(" ", "_") for h in headers]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def boxed_width(plain: str) -> int:
    """How wide a boxed table of the same cells is: each two-space gap becomes `` │ ``, plus borders."""
    first = plain.split("\n", 1)[0]
    return max(len(line) for line in plain.split("\n")) + first.count("  ") + 4


def show_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None, right: Sequence[str] = ()
) -> None:
    """Print rows under headers: rich at a terminal (wrapping, never eliding), plain when piped."""
    plain = plain_table(headers, rows)
    if not sys.stdout.isatty() or boxed_width(plain) > terminal_width():
        if title:
            click.echo(f"# {title}")
        click.echo(plain)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for head in headers:
        table.add_column(head, overflow="fold", justify="right" if head in right else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def show_pairs(pairs: dict[str, Any], width: int = 0) -> None:
    """``key : value`` lines, as ``xl info`` prints them (the same piped or not)."""
    width = width or max((len(k) for k in pairs), default=0)
    for key, value in pairs.items():
        click.echo(f"{key:<{width}} : {value}")


def say(message: str, style: str = "") -> None:
    """A status line: coloured at a terminal, plain text otherwise."""
    if style and sys.stdout.isatty():
        from rich.console import Console

        Console().print(f"[{style}]{message}[/{style}]")
    else:
        click.echo(message)
