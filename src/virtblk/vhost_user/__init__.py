"""virtblk.vhost_user."""
