"""Shared test setup: real-peer fixtures and the never-skip rule (tests/peers/plugin.py)."""

pytest_plugins = ["peers.plugin"]
