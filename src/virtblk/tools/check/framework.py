"""What a check is and what it concludes: the registry every check joins with
:func:`check`, the verdicts (:class:`Finding`), a run's results (:class:`CheckResult`,
:class:`Report`) and the sections of the specifications the checks cite."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from virtblk.spec import Status, feature_names
from virtblk.vhost_user.messages import protocol_feature_names

if TYPE_CHECKING:
    from virtblk.tools.check.session import Context

# Sections of VIRTIO 1.2 (content.tex, device-types/blk/description.tex) and of
# QEMU's docs/interop/vhost-user.rst that the checks cite.
RESERVED_FEATURES = "6.2 Device Requirements: Reserved Feature Bits"
SPLIT_QUEUE = "2.7 Split Virtqueues (descriptor table)"
BLK_CONFIG = "5.2.4 Device configuration layout"
BLK_INIT = "5.2.5 Device Initialization"
BLK_INIT_DEVICE = "5.2.5.2 Device Requirements: Device Initialization"
BLK_OPERATION = "5.2.6 Device Operation"
BLK_OPERATION_DRIVER = "5.2.6.1 Driver Requirements: Device Operation"
BLK_OPERATION_DEVICE = "5.2.6.2 Device Requirements: Device Operation"
VU_PROTOCOL = "vhost-user: Protocol features"
VU_MQ = "vhost-user: Multiple queue support"
VU_CONFIG = "vhost-user: VHOST_USER_GET_CONFIG"


class Outcome(enum.StrEnum):
    """What a check concluded."""

    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class Finding:
    """A check's verdict and what was seen."""

    outcome: Outcome
    detail: str = ""


def passed(detail: str = "") -> Finding:
    """The device did what the spec asks."""
    return Finding(Outcome.PASS, detail)


def failed(seen: str, expected: str) -> Finding:
    """The device broke a requirement: say what it did and what was expected."""
    return Finding(Outcome.FAIL, f"{seen}; expected {expected}")


def warned(detail: str) -> Finding:
    """Allowed by the spec but surprising, or a SHOULD not met."""
    return Finding(Outcome.WARN, detail)


def skipped(why: str) -> Finding:
    """The check does not apply (feature not offered, writes disabled, ...)."""
    return Finding(Outcome.SKIP, why)


class Unexpected(Exception):
    """A step a check relies on went wrong: the check fails with this message."""


class Skip(Exception):
    """The check cannot run here (raised by the shared helpers and by checks)."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One registered check."""

    id: str
    title: str
    section: str
    run: Callable[[Context], Finding]
    writes: bool = False
    """Writes to the device (data or config), restoring it afterwards."""
    disruptive: bool = False
    """May make the device drop the connection: run after the others."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """A check's identity and its finding."""

    id: str
    title: str
    section: str
    outcome: Outcome
    detail: str

    def as_dict(self) -> dict[str, str]:
        """A JSON-able dict."""
        return {
            "id": self.id,
            "title": self.title,
            "section": self.section,
            "outcome": str(self.outcome),
            "detail": self.detail,
        }


CHECKS: list[Check] = []
"""Every check, in the order they run (disruptive ones are moved to the end)."""


def check(
    id: str, title: str, section: str, *, writes: bool = False, disruptive: bool = False
) -> Callable[[Callable[[Context], Finding]], Callable[[Context], Finding]]:
    """Register the decorated function as a check."""

    def register(func: Callable[[Context], Finding]) -> Callable[[Context], Finding]:
        CHECKS.append(Check(id, title, section, func, writes, disruptive))
        return func

    return register


def status_name(status: int) -> str:
    """``OK``, ``IOERR``, ``UNSUPP``..., or the number for values the spec does not name."""
    try:
        return Status(status).name
    except ValueError:
        return f"status {status}"


@dataclasses.dataclass
class Report:
    """The results of a run, with what the device offered."""

    socket: str
    results: list[CheckResult]
    features: int
    protocol_features: int | None
    reconnects: int

    @property
    def failed(self) -> bool:
        """True when any check failed."""
        return any(r.outcome is Outcome.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        """How many checks ended in each outcome."""
        return {str(o): sum(1 for r in self.results if r.outcome is o) for o in Outcome}

    def result(self, check_id: str) -> CheckResult:
        """The result of one check by id."""
        for r in self.results:
            if r.id == check_id:
                return r
        raise KeyError(check_id)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "socket": self.socket,
            "features_offered": feature_names(self.features),
            "protocol_features": (
                protocol_feature_names(self.protocol_features)
                if self.protocol_features is not None
                else None
            ),
            "counts": self.counts(),
            "failed": self.failed,
            "reconnects": self.reconnects,
            "checks": [r.as_dict() for r in self.results],
        }
