"""virtblk.virtio."""
