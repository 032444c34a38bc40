"""virtblk: virtio-blk in Python, both ends of it (driver and vhost-user device).

``virtblk.Disk`` is the entry point for I/O: ``Disk.connect(socket)`` drives any
vhost-user-blk device, ``Disk.embedded()`` starts our own device first.
"""

from virtblk.driver.disk import Disk

__version__ = "0.1.0"
__all__ = ["Disk", "__version__"]
