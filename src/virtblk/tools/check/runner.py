"""A run: every registered check (or those ``--only`` selects) in order, each one's
failure contained, and the :class:`Report`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import virtblk.tools.check.checks  # noqa: F401  (registers the checks)
from virtblk.errors import DeviceGoneError
from virtblk.tools.check.framework import (
    CHECKS,
    Check,
    CheckResult,
    Outcome,
    Report,
    Skip,
    Unexpected,
)
from virtblk.tools.check.session import Context


def ordered_checks() -> list[Check]:
    """The checks in run order: disruptive ones last."""
    return [c for c in CHECKS if not c.disruptive] + [c for c in CHECKS if c.disruptive]


def run_checks(
    socket_path: str | os.PathLike[str],
    *,
    allow_writes: bool = True,
    timeout: float = 5.0,
    queue_size: int = 256,
    only: Sequence[str] = (),
    progress: Callable[[CheckResult], None] | None = None,
) -> Report:
    """Run every check (or those whose id starts with one of ``only``) against the device.

    Checks that write restore the data they touched; ``allow_writes=False`` skips them.
    Raises DeviceGoneError when nothing listens on ``socket_path``.
    """
    path = os.fspath(socket_path)
    ctx = Context(path, timeout=timeout, queue_size=queue_size, allow_writes=allow_writes)
    results: list[CheckResult] = []
    try:
        for chk in ordered_checks():
            if only and not any(chk.id.startswith(prefix) for prefix in only):
                continue
            result = CheckResult(chk.id, chk.title, chk.section, *_run_one(ctx, chk))
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        ctx.close()
    return Report(
        path,
        results,
        ctx.negotiation.features,
        ctx.negotiation.protocol_features,
        max(0, ctx.reconnects - 1),
    )


def _run_one(ctx: Context, chk: Check) -> tuple[Outcome, str]:
    if chk.writes and not ctx.allow_writes:
        return Outcome.SKIP, "writes disabled (--read-only)"
    try:
        finding = chk.run(ctx)
    except Skip as exc:
        return Outcome.SKIP, str(exc)
    except Unexpected as exc:
        return Outcome.FAIL, str(exc)
    except DeviceGoneError as exc:
        ctx.drop_session()
        return Outcome.FAIL, f"the device dropped the connection: {exc}"
    except TimeoutError as exc:
        ctx.drop_session()
        return Outcome.FAIL, f"no completion: {exc}"
    except Exception as exc:  # a check must not stop the run; say what broke
        ctx.drop_session()
        return Outcome.FAIL, f"the check could not complete: {type(exc).__name__}: {exc}"
    return finding.outcome, finding.detail
