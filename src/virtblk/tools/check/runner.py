"""A run: every registered check (or those ``--only`` selects) in order, each one's
failure contained, and the :class:`Report`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import virtblk.tools.check.checks  # noqa: F401  (registers the checks)
from virtblk.errors import DeviceGoneError
from virtblk.spec import Feature
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

RING_GROUPS = ("flush", "io", "limits", "range", "unsupp", "malformed")
"""The groups of checks that send requests through a ring: they run over the split ring,
then again over the packed ring (as ``packed.<id>``) when the device offers it.  The
others (negotiation, config space) do not depend on the ring."""

PACKED_PREFIX = "packed."


def ordered_checks() -> list[Check]:
    """The checks in run order: disruptive ones last."""
    return [c for c in CHECKS if not c.disruptive] + [c for c in CHECKS if c.disruptive]


def ring_checks() -> list[Check]:
    """The request checks in run order, as their packed-ring runs: ``packed.``-prefixed
    ids, the same functions (the context's sessions are packed then)."""
    return [dataclasses.replace(c, id=PACKED_PREFIX + c.id) for c in ordered_checks()
            if c.id.split(".")[0] in RING_GROUPS]


def _selected(chk: Check, only: Sequence[str]) -> bool:
    """Whether ``--only`` selects ``chk``: by its id or, for a packed-ring run, by the id
    of the check it repeats (``io.`` runs the I/O checks over both rings)."""
    base = chk.id.removeprefix(PACKED_PREFIX)
    return not only or any(chk.id.startswith(p) or base.startswith(p) for p in only)


def run_checks(
    socket_path: str | os.PathLike[str],
    *,
    allow_writes: bool = True,
    timeout: float = 5.0,
    queue_size: int = 256,
    only: Sequence[str] = (),
    progress: Callable[[CheckResult], None] | None = None,
) -> Report:
    """Run every check (or those whose id starts with one of ``only``) against the device;
    the request checks (``RING_GROUPS``) over the split ring, then again over the packed
    ring, or reported skipped there when the device does not offer it.

    Checks that write restore the data they touched; ``allow_writes=False`` skips them.
    Raises DeviceGoneError when nothing listens on ``socket_path``.
    """
    path = os.fspath(socket_path)
    ctx = Context(path, timeout=timeout, queue_size=queue_size, allow_writes=allow_writes)
    results: list[CheckResult] = []
    packed_offered = ctx.offered(Feature.RING_PACKED)
    try:
        for packed, checks in ((False, ordered_checks()), (True, ring_checks())):
            ctx.packed = packed
            for chk in checks:
                if not _selected(chk, only):
                    continue
                if packed and not packed_offered:
                    outcome, detail = Outcome.SKIP, "RING_PACKED not offered"
                else:
                    outcome, detail = _run_one(ctx, chk)
                result = CheckResult(chk.id, chk.title, chk.section, outcome, detail)
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
