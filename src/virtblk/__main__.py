"""``python -m virtblk`` runs the CLI."""

from virtblk.cli.main import main

main()
