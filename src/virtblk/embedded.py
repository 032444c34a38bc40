"""The embedded device: our own virtio-blk device on the other end of a socketpair.

With no device named, ``virtblk bench`` and the tests run against this.  By default the
device runs in a child process (so driver and device CPU are measured apart and do not
share a GIL); ``mode="thread"`` keeps it in-process for debugging.  Either way the two
ends speak vhost-user over the socketpair, share memfd memory and signal with eventfds:
exactly the path a real device takes.

This module is the composition root: the one place that knows both the device
(``virtblk.device``) and the driver.  ``Disk.embedded`` and ``AsyncDisk.embedded`` call
:func:`open_embedded` and import nothing of the device themselves.
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
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from virtblk.device.control import ControlServer, notification_counters, send_command
from virtblk.device.options import BackendKind, BlkSettings, DeviceOptions
from virtblk.device.rbd import RbdError
from virtblk.nbd.client import NbdError
from virtblk.util import process_cpu_seconds

if TYPE_CHECKING:
    from virtblk.driver.disk import Disk

    DiskT = TypeVar("DiskT", bound=Disk)

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

    def stats(self) -> dict[str, Any]:
        """The device's request counters (``requests`` by type, bytes, errors, ``queues``),
        as the control socket's ``stats`` answers them."""
        answer = send_command(self.control_path, "stats")
        if not answer.get("ok"):
            raise OSError(f"control socket {self.control_path}: {answer.get('error')}")
        stats: dict[str, Any] = answer["stats"]
        return stats

    def requests(self) -> dict[str, int]:
        """Requests the device has received, by type (``{"IN": 3, "FLUSH": 1}``): what a
        test reads to know what went over the wire, not just what came back."""
        return {name: int(count) for name, count in self.stats()["requests"].items()}

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
        # The options judged themselves when they were made (in this process): what is
        # left for the child to find is what only the storage can tell, and it reports
        # that (or that the device is built) on a pipe before it serves.
        report_r, report_w = os.pipe()
        with os.fdopen(report_r, "rb") as report_file:
            try:
                fd = theirs.fileno()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "virtblk.embedded", str(fd),
                     json.dumps(options.to_dict()), control_path, str(report_w)],
                    pass_fds=[fd, report_w],
                )
            finally:
                os.close(report_w)  # the child has its own copy; EOF is its close
            theirs.close()
            try:
                report = report_file.read()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if report != b"{}":
            proc.wait()
            _raise_build_error(report)
        return EmbeddedDevice(ours, process=proc, workdir=workdir)
    except BaseException:
        ours.close()
        theirs.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def open_embedded(
    disk_class: type[DiskT],
    *,
    size: int,
    backend: BackendKind,
    path: str | os.PathLike[str] | None,
    mode: Literal["process", "thread"],
    num_queues: int,
    queue_size: int,
    queue_depth: int | None,
    experimental_fua: bool,
    read_only: bool,
    zoned: dict[str, Any] | None,
    ceph_conf: str | None = None,
    ceph_id: str | None = None,
    rbd_op_timeout: float | None = None,
    packed: bool | None = None,
    offer_packed: bool = True,
    **device_options: Any,
) -> DiskT:
    """Start our own device and connect a ``disk_class`` (``Disk``) to it: what
    ``Disk.embedded`` does (its signature holds the defaults, its docstring says what the
    arguments mean).

    ``device_options`` become :class:`BlkSettings` here, in the caller's process: a
    misspelled or mistyped option raises TypeError naming it before any device starts."""
    # ``packed`` is the driver's choice (as for ``Disk.connect``); the device's setting of
    # that name, whether it offers the packed ring, comes in as ``offer_packed``.
    device_options = {**device_options, "packed": offer_packed}
    settings = BlkSettings.from_dict(
        {**device_options, "fua": True} if experimental_fua else device_options)
    embedded = start_embedded(
        # An NBD server tells the size (Disk.embedded's default size is not one given).
        DeviceOptions(backend=backend, size=None if backend == "nbd" else size, path=path,
                      read_only=read_only,
                      num_queues=num_queues, queue_size=queue_size, device=settings,
                      zoned=zoned, ceph_conf=ceph_conf, ceph_id=ceph_id,
                      rbd_op_timeout=rbd_op_timeout),
        mode,
    )
    try:
        disk = disk_class.from_socket(
            embedded.sock,
            num_queues=num_queues,
            queue_size=queue_size,
            queue_depth=queue_depth,
            experimental_fua=experimental_fua,
            on_close=embedded.stop,
            packed=packed,
        )
    except BaseException:
        embedded.stop()
        raise
    disk.embedded_device = embedded
    return disk


def _serve(sock: socket.socket, device: Any) -> None:
    from virtblk.vhost_user.server import serve_connected

    try:
        serve_connected(sock, device)
    finally:
        device.close()
        device.backend.close()
        sock.close()


def _build_error(exc: Exception) -> dict[str, Any]:
    """What the parent needs to raise ``exc`` again as itself (an OSError by its errno,
    so its message names the errno once)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    return {"type": type(exc).__name__, "message": str(exc)}


def _raise_build_error(report: bytes) -> None:
    """Raise in the parent what the child could not build the device for: the child's
    own exception where it is an OSError, ValueError or TypeError."""
    if not report:
        raise RuntimeError("the embedded device exited before building the device "
                           "(its standard error says why)")
    error = json.loads(report)
    if "errno" in error:
        raise OSError(error["errno"], error["strerror"], error["filename"])
    kinds: dict[str, type[Exception]] = {"ValueError": ValueError, "TypeError": TypeError,
                                         "RbdError": RbdError, "NbdError": NbdError}
    raise kinds.get(error["type"], RuntimeError)(error["message"])


def main(argv: list[str]) -> int:
    """Child entry point:
    ``python -m virtblk.embedded FD OPTIONS_JSON CONTROL_PATH REPORT_FD``.  REPORT_FD gets
    ``{}`` once the device is built, or why it could not be (see
    :func:`_raise_build_error`), and is closed before the device serves."""
    logging.basicConfig(level=logging.WARNING, format="virtblk-device: %(message)s")
    fd, spec, control_path = int(argv[0]), json.loads(argv[1]), argv[2]
    sock = socket.socket(fileno=fd)
    with os.fdopen(int(argv[3]), "w") as report:
        try:
            device = DeviceOptions.from_dict(spec).build()
        except Exception as exc:
            report.write(json.dumps(_build_error(exc)))
            sock.close()
            return 1
        report.write("{}")
    with ControlServer(control_path, device):
        _serve(sock, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
