"""virtblk: virtio-blk in Python, both ends of it (driver and vhost-user device).

``virtblk.Disk`` is the entry point for I/O: ``Disk.connect(socket)`` drives any
vhost-user-blk device, ``Disk.embedded()`` starts our own device first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtblk.driver.disk import Disk

__version__ = "0.1.0"
__all__ = ["Disk", "__version__"]


def __getattr__(name: str) -> Any:
    """``virtblk.Disk`` is imported when first used: the driver, vhost-user and numpy cost
    a quarter of a second, and every ``virtblk.*`` import runs this module (``virtblk
    --help`` needs none of them)."""
    if name == "Disk":
        from virtblk.driver.disk import Disk

        return Disk
    raise AttributeError(f"module 'virtblk' has no attribute {name!r}")
