"""``virtblk check``: a conformance run against any vhost-user-blk device."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # imported where they are used: ``--help`` loads no check and no rich
    from rich.console import Console

    from virtblk.tools.check import Report

_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}
"""rich's style of each outcome (``Outcome`` is a ``StrEnum``: its values are the keys)."""


def render(report: Report, console: Console) -> None:
    """The human form: one table row per check, then the totals."""
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
    counts = report.counts()
    summary = ", ".join(f"{n} {name}" for name, n in counts.items())
    if report.reconnects:
        summary += f"; reconnected {report.reconnects} times"
    console.print(summary)


@click.command()
@click.argument("socket_path", metavar="SOCKET")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
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
    socket_path: str, as_json: bool, read_only: bool, timeout: float, only: tuple[str, ...]
) -> None:
    """Check a vhost-user-blk device against the virtio-blk specification.

    Negotiation, config space, every request type offered, limits, out-of-range and
    malformed requests, flush semantics.  Checks that write save the data they touch and
    write it back; --read-only skips them.  Exits 1 when a check fails.
    """
    from rich.console import Console

    from virtblk.tools.check import run_checks

    if not read_only:
        click.echo(
            "virtblk check: writes to the device (the data touched is restored); "
            "use --read-only to avoid writes",
            err=True,
        )
    try:
        report = run_checks(socket_path, allow_writes=not read_only, timeout=timeout, only=only)
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        render(report, Console(width=max(Console().width, 160)))
    sys.exit(1 if report.failed else 0)
