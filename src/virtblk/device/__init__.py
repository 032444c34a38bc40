"""virtblk.device."""
