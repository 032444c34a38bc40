"""qemu-storage-daemon as a real vhost-user-blk peer for tests.

The daemon is the reference device our driver must interoperate with, and the
reference backend our guest tests compare against. Tests start it through
`QemuStorageDaemon` (a context manager) or the `qsd_factory` fixture, which also
cleans up. A tiny QMP client is included because some tests change the device
under the driver (e.g. `block_resize`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from peers.process import wait_ready

QSD_BINARY = "qemu-storage-daemon"

#: How long a daemon may take to create its export before we give up.
START_TIMEOUT = 10.0


class QsdError(RuntimeError):
    """The daemon could not start, died, or misbehaved; the message carries its stderr."""


class QmpError(RuntimeError):
    """A QMP command returned an error object."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QMP {command} failed: {self.error_class}: {self.desc}")


def short_socket_dir(prefix: str = "vb-") -> Path:
    """A fresh directory under /tmp for Unix sockets.

    sun_path holds only 108 bytes and pytest's tmp_path easily exceeds that, so
    sockets never live in tmp_path.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class QmpClient:
    """A blocking QMP client: connect, negotiate capabilities, run commands.

    Asynchronous events that arrive while waiting for a reply are kept in
    `events` rather than mistaken for the reply.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(os.fspath(path))
        self._file = self._sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read_message()
        if "QMP" not in self.greeting:
            raise QsdError(f"not a QMP greeting: {self.greeting!r}")
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QsdError("QMP connection closed by the daemon")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QsdError(f"QMP message is not an object: {line!r}")
        return message

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command; return its "return" member or raise `QmpError`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise QmpError(command, message["error"])
            return message.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class QemuStorageDaemon:
    """One qemu-storage-daemon process exporting one vhost-user-blk device.

    Exactly one of `image` (a file, used as a raw image), `null_size` (a null-co
    device of that many bytes) or `rbd` (an RBD image, "POOL/IMAGE", of the cluster
    that `ceph_conf` describes, opened as client `ceph_id`) chooses the backend. For
    rbd, `cache_direct` is librbd's cache turned off (QEMU sets ``rbd_cache=false``
    for a node opened with ``cache.direct=on``). The export listens on
    `socket_path`; `qmp_path` (optional) gets a QMP monitor. Use as a context
    manager: `__enter__` returns once the export accepts connections, `__exit__`
    terminates the daemon and waits for it.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        image: str | os.PathLike[str] | None = None,
        null_size: int | None = None,
        rbd: str | None = None,
        ceph_conf: str | os.PathLike[str] | None = None,
        ceph_id: str = "admin",
        read_zeroes: bool = True,
        num_queues: int = 1,
        writable: bool = True,
        logical_block_size: int | None = None,
        cache_direct: bool = False,
        qmp_path: str | os.PathLike[str] | None = None,
        node_name: str = "disk0",
        export_id: str = "exp0",
    ) -> None:
        if sum(choice is not None for choice in (image, null_size, rbd)) != 1:
            raise ValueError("give exactly one of image=, null_size= or rbd=")
        if rbd is not None and (ceph_conf is None or rbd.count("/") != 1):
            raise ValueError("rbd= takes 'POOL/IMAGE' and needs ceph_conf=")
        self.socket_path = Path(socket_path)
        self.qmp_path = Path(qmp_path) if qmp_path is not None else None
        self.image = Path(image) if image is not None else None
        self.null_size = null_size
        self.rbd = rbd
        self.ceph_conf = Path(ceph_conf) if ceph_conf is not None else None
        self.ceph_id = ceph_id
        self.num_queues = num_queues
        self.writable = writable
        self.node_name = node_name
        self.export_id = export_id
        self._workdir = Path(tempfile.mkdtemp(prefix="vb-qsd-"))
        self._stderr_path = self._workdir / "stderr"
        self._pidfile = self._workdir / "pid"
        self.argv = self._command(read_zeroes, logical_block_size, cache_direct)
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None
        self._final_stderr: str | None = None

    def _command(
        self, read_zeroes: bool, logical_block_size: int | None, cache_direct: bool
    ) -> list[str]:
        if self.image is not None:
            blockdev = (
                f"driver=file,node-name={self.node_name},filename={self.image},"
                f"cache.direct={_onoff(cache_direct)}"
            )
        elif self.rbd is not None:
            pool, name = self.rbd.split("/")
            blockdev = (
                f"driver=rbd,node-name={self.node_name},pool={pool},image={name},"
                f"conf={self.ceph_conf},user={self.ceph_id},cache.direct={_onoff(cache_direct)}"
            )
        else:
            blockdev = (
                f"driver=null-co,node-name={self.node_name},size={self.null_size},"
                f"read-zeroes={_onoff(read_zeroes)}"
            )
        export = (
            f"type=vhost-user-blk,id={self.export_id},node-name={self.node_name},"
            f"addr.type=unix,addr.path={self.socket_path},writable={_onoff(self.writable)},"
            f"num-queues={self.num_queues}"
        )
        if logical_block_size is not None:
            export += f",logical-block-size={logical_block_size}"
        argv = [QSD_BINARY, "--blockdev", blockdev, "--export", export]
        if self.qmp_path is not None:
            argv += [
                "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=qmp0",
            ]  # fmt: skip
        # The daemon writes its pidfile only after every export exists: our readiness signal.
        argv += ["--pidfile", str(self._pidfile)]
        return argv

    @property
    def stderr(self) -> str:
        """What the daemon wrote to stderr so far (kept after `stop`)."""
        if self._final_stderr is not None:
            return self._final_stderr
        try:
            return self._stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> QemuStorageDaemon:
        """Start the daemon and wait (bounded) until its export accepts connections."""
        if shutil.which(QSD_BINARY) is None:
            raise QsdError(f"{QSD_BINARY} is not installed (apt-get install qemu-utils)")
        with self._stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Wait for the pidfile, which the daemon writes once every export listens.

        The socket is not probed with a connection: qemu-storage-daemon 7.2 mishandles a
        client that closes at once (about one start in 150 later closed, or aborted on,
        the next connection it accepted, such as the QMP monitor's).
        """
        assert self.process is not None
        try:
            rc = wait_ready(
                self.process,
                self._pidfile.exists,
                START_TIMEOUT,
                interval=0.02,
            )
        except TimeoutError:
            raise QsdError(
                f"qemu-storage-daemon export {self.socket_path} not ready after "
                f"{START_TIMEOUT:.0f} s\ncommand: {' '.join(self.argv)}\nstderr:\n{self.stderr}"
            ) from None
        if rc is not None:
            raise QsdError(
                f"qemu-storage-daemon exited with status {rc} before its export was ready\n"
                f"command: {' '.join(self.argv)}\nstderr:\n{self.stderr}"
            )

    def qmp(
        self, command: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> Any:
        """Run a QMP command on the daemon's monitor and return its "return" member.

        Keyword names have "_" turned into "-" (`node_name=` is sent as "node-name");
        pass `arguments` for names that really contain "_". Raises `QmpError`.
        """
        if self.qmp_path is None:
            raise QsdError("this daemon was started without qmp_path")
        if self._qmp is None:
            self._qmp = QmpClient(self.qmp_path)
        merged = dict(arguments or {})
        merged.update({name.replace("_", "-"): value for name, value in kwargs.items()})
        return self._qmp.execute(command, merged)

    def stop(self) -> int | None:
        """Terminate the daemon (SIGTERM, then SIGKILL after 10 s); return its exit status."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        rc = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                rc = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                rc = self.process.wait()
        self._final_stderr = self.stderr
        shutil.rmtree(self._workdir, ignore_errors=True)
        return rc

    def __enter__(self) -> QemuStorageDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _onoff(value: bool) -> str:
    return "on" if value else "off"
