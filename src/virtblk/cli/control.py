"""``virtblk control``: change a device that ``virtblk serve --control`` is running.

``virtblk control CTRL.sock resize 2G`` resizes the disk and the connected frontend gets a
config-change message; ``set-read-only``, ``set-cache-mode``, ``stats`` and
``get-config`` work the same way.  Every subcommand takes ``--json`` to print the device's
answer as it came (one JSON object); without it the answer is summarised for people.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from virtblk.cli.params import SIZE
from virtblk.util import human_size


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print the raw answer.")(f)


def _request(ctx: click.Context, command: str, **arguments: Any) -> dict[str, Any]:
    """Send, and turn every failure into a click error (exit status 1)."""
    from virtblk.device.control import send_command  # not for --help: the device package

    path, timeout = ctx.obj
    try:
        answer = send_command(path, command, timeout=timeout, **arguments)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: {exc}") from exc
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error", "the device refused")))
    return answer


def _notified(answer: dict[str, Any]) -> str:
    return ("frontend notified" if answer.get("frontend_connected")
            else "no frontend connected")


def _show(data: dict[str, Any], indent: int = 0) -> None:
    """Nested dicts as an indented ``key  value`` listing."""
    if not data:
        return
    width = max(len(str(k)) for k in data)
    for key, value in data.items():
        label = " " * indent + str(key).replace("_", " ")
        if isinstance(value, dict):
            click.echo(label)
            _show(value, indent + 2)
        elif isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                for i, item in enumerate(value):
                    click.echo(f"{label} {i}")
                    _show(item, indent + 2)
            else:
                click.echo(f"{label:<{width + indent}}  {' '.join(map(str, value)) or '-'}")
        else:
            click.echo(f"{label:<{width + indent}}  {value}")


@click.group()
@click.argument("socket_path", metavar="CONTROL_SOCKET")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait.")
@click.pass_context
def control(ctx: click.Context, socket_path: str, timeout: float) -> None:
    """Send one request to the control socket of `virtblk serve --control`."""
    ctx.obj = (socket_path, timeout)


@control.command()
@click.argument("size", type=SIZE)
@_json_option
@click.pass_context
def resize(ctx: click.Context, size: int, as_json: bool) -> None:
    """Set the disk size (bytes, or 512M, 2G...) and tell the frontend."""
    answer = _request(ctx, "resize", size=size)
    if as_json:
        click.echo(json.dumps(answer))
        return
    click.echo(f"resized {human_size(answer['old_size'])} -> {human_size(answer['size'])} "
               f"({answer['capacity']} sectors; {_notified(answer)})")


@control.command("set-read-only")
@click.argument("state", type=click.BOOL, metavar="on|off")
@_json_option
@click.pass_context
def set_read_only(ctx: click.Context, state: bool, as_json: bool) -> None:
    """Fail (on) or accept (off) writes from now on.

    VIRTIO_BLK_F_RO is fixed at negotiation: a running driver is sent a config change
    but sees the change only as writes failing with EIO.
    """
    answer = _request(ctx, "set-read-only", read_only=state)
    if as_json:
        click.echo(json.dumps(answer))
        return
    click.echo(f"read-only {'on' if answer['read_only'] else 'off'} ({_notified(answer)})")


@control.command("set-cache-mode")
@click.argument("mode", metavar='"write back"|"write through"')
@_json_option
@click.pass_context
def set_cache_mode(ctx: click.Context, mode: str, as_json: bool) -> None:
    """Switch the write cache (also accepts writeback / writethrough)."""
    answer = _request(ctx, "set-cache-mode", mode=mode)
    if "warning" in answer:
        click.echo(f"warning: {answer['warning']}", err=True)
    if as_json:
        click.echo(json.dumps(answer))
        return
    click.echo(f"cache mode {answer['cache_mode']} ({_notified(answer)})")


@control.command()
@_json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Request counters, bytes, errors, per-queue state."""
    answer = _request(ctx, "stats")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    answer.pop("ok")
    _show(answer)


@control.command("get-config")
@_json_option
@click.pass_context
def get_config(ctx: click.Context, as_json: bool) -> None:
    """The config space as the driver reads it now, and the features."""
    answer = _request(ctx, "get-config")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    answer.pop("ok")
    _show(answer)
