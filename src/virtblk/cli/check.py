"""``virtblk check``: a conformance run against any vhost-user-blk device."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # imported where they are used: ``--help`` loads no check and no rich
    from rich.console import Console

    from virtblk.tools.check import CheckResult, Report

_MARK: dict[str, dict[str, Any]] = {
    "pass": {"fg": "green"},
    "fail": {"fg": "red", "bold": True},
    "warn": {"fg": "yellow"},
    "skip": {"dim": True},
}
"""click's style of each outcome's mark in the compact form (``Outcome`` is a ``StrEnum``:
its values are the keys)."""

_STYLE = {outcome: " ".join([*(k for k in ("bold", "dim") if style.get(k)),
                             *([style["fg"]] if "fg" in style else [])])
          for outcome, style in _MARK.items()}
"""The same styles in rich's words, for the full table."""

_DETAIL_INDENT = " " * 6


def render_compact(report: Report, width: int) -> None:
    """The default human form, no line wider than ``width``: one line per check (outcome,
    id, title; a long title wraps under itself), and under a failure what was seen against
    what was expected and the spec section; then the totals."""
    id_width = max((len(r.id) for r in report.results), default=0)
    title_column = 4 + 2 + id_width + 2
    title_width = max(20, width - title_column)
    for r in report.results:
        title = _wrap(r.title, title_width) or [""]
        mark = click.style(f"{r.outcome:<4}", **_MARK[r.outcome])
        click.echo(f"{mark}  {r.id:<{id_width}}  {title[0]}")
        for more in title[1:]:
            click.echo(" " * title_column + more)
        if r.outcome == "fail":
            for line in _explain(r, max(width, len(_DETAIL_INDENT) + 20)):
                click.echo(line)
    click.echo(_summary(report))


def _explain(r: CheckResult, width: int) -> list[str]:
    """What was seen against what was expected, then where the spec says so."""
    return [line for text in (r.detail, f"spec: {r.section}")
            for line in _wrap(text, width, indent=_DETAIL_INDENT)]  # fmt: skip


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    # Options and ids keep their hyphens on one line (--read-only, unsupp.not-offered).
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)  # fmt: skip


def render_table(report: Report, console: Console) -> None:
    """The ``--verbose`` form: one table row per check with its spec section and its
    finding, then the totals."""
    from rich.table import Table

    table = Table(title=f"virtblk check {report.socket}", show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("what")
    table.add_column("spec")
    table.add_column("finding")
    for r in report.results:
        style = _STYLE[r.outcome]
        table.add_row(r.id, f"[{style}]{r.outcome}[/]", r.title, r.section, r.detail)
    console.print(table)
    console.print(_summary(report))


def _summary(report: Report) -> str:
    summary = ", ".join(f"{n} {name}" for name, n in report.counts().items())
    if report.reconnects:
        summary += f"; reconnected {report.reconnects} times"
    return summary


@click.command()
@click.argument("socket_path", metavar="SOCKET")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "-v", "--verbose", is_flag=True,
    help="The full table: every check's title, spec section and finding.",
)  # fmt: skip
@click.option("--read-only", is_flag=True, help="Skip every check that writes (data or config).")
@click.option(
    "--timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for a reply or a completion.",
)
@click.option(
    "--only",
    multiple=True,
    metavar="PREFIX",
    help="Run only checks whose id starts with PREFIX (repeatable), e.g. io. or range.",
)
def check(
    socket_path: str,
    as_json: bool,
    verbose: bool,
    read_only: bool,
    timeout: float,
    only: tuple[str, ...],
) -> None:
    """Check a vhost-user-blk device against the virtio-blk specification.

    Negotiation, config space, every request type offered, limits, out-of-range and
    malformed requests, flush semantics.  Checks that write save the data they touch and
    write it back; --read-only skips them.  One line per check, with what was seen and
    the spec section under a failure (-v: the full table).  Exits 1 when a check fails.
    """
    from virtblk.tools.check import run_checks

    width = shutil.get_terminal_size().columns
    if not read_only:
        warning = ("virtblk check: writes to the device (the data touched is restored); "
                   "use --read-only to avoid writes")  # fmt: skip
        click.echo("\n".join(_wrap(warning, max(width, 40))), err=True)
    try:
        report = run_checks(socket_path, allow_writes=not read_only, timeout=timeout, only=only)
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif verbose:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # a file or a pipe: whole rows, for grep and diff
            console = Console(width=max(console.width, 160))
        render_table(report, console)  # a terminal: its own width, the long cells wrapped
    else:
        render_compact(report, width)
    sys.exit(1 if report.failed else 0)
