"""virtblk.cli."""
