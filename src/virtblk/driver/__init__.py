"""virtblk.driver."""
