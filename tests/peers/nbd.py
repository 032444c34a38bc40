"""NBD servers as real peers: ``qemu-nbd`` over a raw file and ``nbdkit memory``.

Each runs in the foreground as our child, in a process group of its own, listening on a
Unix socket (the default) or on TCP 127.0.0.1 at a free port.  ``stop`` ends it (SIGTERM,
then SIGKILL), ``kill`` crashes it (SIGKILL), ``start`` again brings it back on the same
address: what a test of a lost and recovered server needs.  nbdkit also gets
``--exit-with-parent``, so it cannot outlive the test run; qemu-nbd has no such option and
is stopped by the fixture (and found by the leftover check otherwise).

qemu-nbd runs ``--persistent`` (it would exit when its first client leaves) with
``--shared`` clients (1 by default, as qemu-nbd's own default: a second client waits until
the first leaves).  What it serves is the file, so a test reads the file itself.
nbdkit's memory plugin takes many clients at once (CAN_MULTI_CONN): a test reads its data
with ``nbdcopy`` over a second connection (:meth:`NbdServer.read_all`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from peers.process import accepts, kill_group, wait_ready

#: How long a server may take to listen.
START_TIMEOUT = 20.0

#: The Debian packages these servers and their tools come from (scripts/test installs them).
PACKAGES = ("qemu-utils", "nbdkit", "libnbd-bin")


class NbdServerError(RuntimeError):
    """The server could not start, or a tool on it failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class NbdServer:
    """One NBD server process (see the module docstring); subclasses give the command."""

    program = ""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 tcp: bool = False, export: str = "") -> None:
        if (socket_path is None) == (not tcp):
            raise ValueError("give exactly one of socket_path= or tcp=True")
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.port = free_port() if tcp else 0
        self.export = export
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="vb-nbd-"))
        self._log = self._workdir / "log"

    @property
    def uri(self) -> str:
        """The export's NBD URI."""
        if self.socket_path is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    @property
    def log(self) -> str:
        """What the server wrote so far."""
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _listening(self) -> bool:
        if self.socket_path is not None:
            return accepts(self.socket_path)
        return _tcp_accepts(self.port)

    def start(self) -> NbdServer:
        """Start the server and wait (bounded) until it listens."""
        argv = self.command()
        if shutil.which(argv[0]) is None:
            raise NbdServerError(f"{argv[0]} is not installed (apt-get install "
                                 f"{' '.join(PACKAGES)})")
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, start_new_session=True)
        try:
            rc = wait_ready(self.process, self._listening, START_TIMEOUT, interval=0.02)
        except TimeoutError:
            self.stop()
            raise NbdServerError(f"{argv[0]} not listening after {START_TIMEOUT:.0f} s\n"
                                 f"command: {' '.join(argv)}\n{self.log}") from None
        if rc is not None:
            raise NbdServerError(f"{argv[0]} exited with status {rc}\ncommand: "
                                 f"{' '.join(argv)}\n{self.log}")
        return self

    def kill(self) -> None:
        """Crash the server (SIGKILL to its group) and reap it."""
        if self.process is not None and self.process.poll() is None:
            kill_group(self.process)

    def stop(self) -> int | None:
        """Terminate the server (SIGTERM, SIGKILL after 10 s); its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(process)
        return process.wait()

    def close(self) -> None:
        """Stop the server and remove its files."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def read_all(self) -> bytes:
        """The whole export, read by ``nbdcopy`` over a connection of its own."""
        out = self._workdir / "copy.raw"
        run = subprocess.run(["nbdcopy", self.uri, str(out)], capture_output=True,
                             text=True, timeout=120, check=False)
        if run.returncode:
            raise NbdServerError(f"nbdcopy {self.uri}: {run.stderr.strip()}")
        try:
            return out.read_bytes()
        finally:
            out.unlink()

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class QemuNbd(NbdServer):
    """``qemu-nbd`` exporting ``image`` (a raw file) as ``export``."""

    program = "qemu-nbd"

    def __init__(self, image: str | os.PathLike[str],
                 socket_path: str | os.PathLike[str] | None = None, *, tcp: bool = False,
                 export: str = "disk", read_only: bool = False, shared: int = 1) -> None:
        super().__init__(socket_path, tcp=tcp, export=export)
        self.image = Path(image)
        self.read_only = read_only
        self.shared = shared

    def command(self) -> list[str]:
        argv = ["qemu-nbd", "--persistent", "--format=raw", f"--export-name={self.export}",
                f"--shared={self.shared}"]
        if self.read_only:
            argv.append("--read-only")
        if self.socket_path is not None:
            argv.append(f"--socket={self.socket_path}")
        else:
            argv += ["--bind=127.0.0.1", f"--port={self.port}"]
        return [*argv, str(self.image)]


class Nbdkit(NbdServer):
    """``nbdkit PLUGIN ARGS...`` (``plugin`` is both): e.g. ``eval`` with shell snippets,
    for a server that advertises what a test needs.

    ``filters`` are nbdkit filters and ``params`` their ``KEY=VALUE`` parameters
    (``nozero`` with ``zeromode=none`` hides WRITE_ZEROES, ``blocksize-policy`` with
    ``blocksize-maximum=N`` advertises a maximum payload); ``log_requests`` adds nbdkit's
    ``log`` filter, whose lines :meth:`requests` returns (each command, its range and
    flags, as the server received it); ``options`` are nbdkit's own (``--tls=require``).
    """

    program = "nbdkit"

    def __init__(self, plugin: Sequence[str],
                 socket_path: str | os.PathLike[str] | None = None, *,
                 tcp: bool = False, read_only: bool = False, filters: Sequence[str] = (),
                 params: Sequence[str] = (), log_requests: bool = False,
                 options: Sequence[str] = ()) -> None:
        super().__init__(socket_path, tcp=tcp)
        self.plugin = list(plugin)
        self.read_only = read_only
        self.filters = [*(["log"] if log_requests else []), *filters]
        self.params = [*([f"logfile={self.request_log}"] if log_requests else []), *params]
        self.options = list(options)

    @property
    def request_log(self) -> Path:
        """Where the ``log`` filter writes."""
        return self._workdir / "requests.log"

    def requests(self, connection: int = 1) -> list[str]:
        """The request lines of the ``log`` filter so far on the server's ``connection``
        (they count from 1) (``Write id=1 offset=0x0 count=0x1000 fua=1 ...``), without
        their time stamps and answers."""
        try:
            lines = self.request_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        fields = [line.split(" ", 3) for line in lines]
        return [f[3] for f in fields if len(f) == 4 and f[2] == f"connection={connection}"
                and f[3].endswith(" ...") and not f[3].startswith("...")]

    def command(self) -> list[str]:
        argv = ["nbdkit", "--foreground", "--exit-with-parent"]
        if self.read_only:
            argv.append("--readonly")
        if self.socket_path is not None:
            argv += ["--unix", str(self.socket_path)]
        else:
            argv += ["--ipaddr", "127.0.0.1", "--port", str(self.port)]
        argv += [*self.options, *(f"--filter={name}" for name in self.filters)]
        return [*argv, *self.plugin, *self.params]


class NbdkitMemory(Nbdkit):
    """``nbdkit memory SIZE``: a RAM disk that takes many clients."""

    def __init__(self, size: int, socket_path: str | os.PathLike[str] | None = None,
                 **options: Any) -> None:
        super().__init__(["memory", str(size)], socket_path, **options)
        self.size = size
