"""Killing a device and starting it again, for the reconnect tests (issue 11).

Import as ``from interop.restarts import KillableServe``.
"""

from __future__ import annotations

import os
import signal

from interop.serve_process import ServeProcess
from peers.process import wait_group_gone


class KillableServe(ServeProcess):
    """``virtblk serve`` that can be killed with SIGKILL, as a crash would."""

    def kill(self) -> None:
        """SIGKILL the server's group and wait until it is gone."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        left = wait_group_gone(self.process.pid, 10.0)
        assert not left, f"processes {left} survived SIGKILL"
        self.process = None
