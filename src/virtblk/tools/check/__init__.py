"""A conformance run against any vhost-user-blk device (``virtblk check``).

Each check is a small function registered with an id, a title and the section of the
VIRTIO 1.2 specification (or of QEMU's vhost-user protocol document) it tests, and returns
a :class:`Finding`: pass, fail (what was seen against what was expected), skip (why it
does not apply) or warn (legal but surprising, or a SHOULD not met).

Requests are built with the driver's lower layers (``VirtioBlk`` and
``HardwareQueue.submit`` with hand-made buffers), so the checks can send what the
``Disk`` API refuses up front: reads past the end, odd lengths, flags, too many segments,
descriptors pointing outside memory.  Checks that write save the data they touch and
write it back; ``allow_writes=False`` skips them.  A device that drops the connection
(qemu-storage-daemon does on a bad descriptor) ends that check's session only: the next
check reconnects, and the checks that can do this run last.

The modules: :mod:`.framework` (the registry, verdicts and results), :mod:`.session` (the
harness every check runs in), :mod:`.checks` (the checks, one module per group of the
specification), :mod:`.runner` (a run and its report).
"""

from virtblk.tools.check.framework import CHECKS, Check, CheckResult, Finding, Outcome, Report
from virtblk.tools.check.runner import run_checks

__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "Finding",
    "Outcome",
    "Report",
    "run_checks",
]
