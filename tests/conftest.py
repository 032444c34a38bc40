"""Shared test setup: real-peer fixtures and the never-skip rule (tests/peers/plugin.py)."""

import sys
from pathlib import Path

# Tests import the helpers as `peers.*`; this holds under any --import-mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest_plugins = ["peers.plugin"]
