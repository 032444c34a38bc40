"""The embedded device: our own virtio-blk device on the other end of a socketpair.

With no device named, ``virtblk bench`` and the tests run against this.  By default the
device runs in a child process (so driver and device CPU are measured apart and do not
share a GIL); ``mode="thread"`` keeps it in-process for debugging.  Either way the two
ends speak vhost-user over the socketpair, share memfd memory and signal with eventfds:
exactly the path a real device takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any, Literal

from virtblk.device.control import ControlServer, notification_counters
from virtblk.device.options import DeviceOptions
from virtblk.util import process_cpu_seconds

log = logging.getLogger("virtblk.embedded")


class EmbeddedDevice:
    """A running embedded device; ``sock`` is the driver's end of the connection."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        process: subprocess.Popen[bytes] | None = None,
        thread: threading.Thread | None = None,
        control: ControlServer | None = None,
        workdir: str,
    ) -> None:
        self.sock = sock
        self.process = process
        self.thread = thread
        self._control = control
        self._workdir = workdir
        self.control_path = os.path.join(workdir, "control.sock")
        """The device's control socket (``virtblk control`` speaks to it)."""

    def counters(self) -> dict[str, int]:
        """The device's notification counters, summed over its queues."""
        return notification_counters(self.control_path)

    @property
    def pid(self) -> int:
        """The process that runs the device (ours in thread mode)."""
        return self.process.pid if self.process is not None else os.getpid()

    def cpu_seconds(self) -> float:
        """User + system CPU the device process has used so far (child mode)."""
        if self.process is None:
            raise ValueError("CPU time of a thread-mode device is not separable")
        return process_cpu_seconds(self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the device: the driver side has closed (or we close) the socket."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded device %d did not exit; killing it", self.process.pid)
                self.process.kill()
                self.process.wait()
        if self.thread is not None:
            self.thread.join(timeout)
        if self._control is not None:
            self._control.close()
        shutil.rmtree(self._workdir, ignore_errors=True)


def start_embedded(
    options: DeviceOptions, mode: Literal["process", "thread"] = "process"
) -> EmbeddedDevice:
    """Start a device described by ``options`` on a fresh socketpair."""
    workdir = tempfile.mkdtemp(prefix="virtblk-embedded-")
    control_path = os.path.join(workdir, "control.sock")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if mode == "thread":
            device = dataclasses.replace(options, workers=options.workers or "thread").build()
            control: ControlServer | None = None
            try:
                control = ControlServer(control_path, device).start()
                thread = threading.Thread(
                    target=_serve, args=(theirs, device), name="virtblk-embedded", daemon=True
                )
                thread.start()
            except BaseException:
                if control is not None:
                    control.close()
                device.close()
                device.backend.close()
                raise
            return EmbeddedDevice(ours, thread=thread, control=control, workdir=workdir)
        # Fail in the parent, with a clear message, on options the child would reject.
        options.make_backend().close()
        fd = theirs.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtblk.embedded", str(fd), json.dumps(options.to_dict()),
             control_path],
            pass_fds=[fd],
        )
        theirs.close()
        return EmbeddedDevice(ours, process=proc, workdir=workdir)
    except BaseException:
        ours.close()
        theirs.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _serve(sock: socket.socket, device: Any) -> None:
    from virtblk.vhost_user.server import serve_connected

    try:
        serve_connected(sock, device)
    finally:
        device.close()
        device.backend.close()
        sock.close()


def main(argv: list[str]) -> int:
    """Child entry point: ``python -m virtblk.embedded FD OPTIONS_JSON CONTROL_PATH``."""
    logging.basicConfig(level=logging.WARNING, format="virtblk-device: %(message)s")
    fd, spec, control_path = int(argv[0]), json.loads(argv[1]), argv[2]
    sock = socket.socket(fileno=fd)
    device = DeviceOptions.from_dict(spec).build()
    with ControlServer(control_path, device):
        _serve(sock, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
