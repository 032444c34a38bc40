"""Click parameter types shared by the subcommands."""

from __future__ import annotations

from typing import Any

import click

from virtblk.util import parse_size


class SizeParam(click.ParamType[int]):
    """A byte size with fio-style binary units (``4k``, ``64M``, ``1G``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """Parse or fail with click's usage error."""
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
