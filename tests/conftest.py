"""Shared test setup: real-peer fixtures, the never-skip rule and the leftover-process check
(tests/peers/plugin.py)."""

import sys
from pathlib import Path

# Tests import the helpers as `peers.*`; this holds under any --import-mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# pytester: the plugin's own tests run child sessions with it.
pytest_plugins = ["peers.plugin", "pytester"]
