"""virtblk: virtio-blk in Python, both ends of it (driver and vhost-user device)."""

__version__ = "0.1.0"
