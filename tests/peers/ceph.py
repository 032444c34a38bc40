"""A one-node Ceph cluster as a real peer for the RBD tests.

One monitor and one OSD from Debian's packages (``ceph-mon``, ``ceph-osd``,
``ceph-common``): the OSD keeps its objects in memory (the ``memstore`` object store),
authentication is off, both listen on 127.0.0.1 only, and everything (configuration,
monitor store, logs, admin sockets) lives in one temporary directory that ``stop``
removes. No manager daemon: RBD I/O does not need one.

Both daemons run in the foreground (``-f``) as our children, each in a process group of
its own, so ``stop`` ends them for sure and the leftover check sees them while they live.
A memstore OSD loses its objects when it dies: to make the cluster unavailable for a
while, ``pause_osd`` stops the OSD with SIGSTOP and ``resume_osd`` lets it go on.

The cluster comes up in 2-4 seconds here; ``start`` fails with :class:`CephError`
(carrying the daemon's log) rather than waiting long.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from peers.process import kill_group

#: The Debian packages the cluster needs (installed by scripts/test when missing).
PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common")

#: How long the cluster may take to come up before start() gives up.
START_TIMEOUT = 60.0

#: How long one ``ceph``/``rbd`` command may run (they hang on an unreachable cluster).
COMMAND_TIMEOUT = 60.0

#: The pool every RBD test uses.
POOL = "rbd"


class CephError(RuntimeError):
    """The cluster could not start, or a command on it failed."""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the monitor binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class CephCluster:
    """One monitor, one memstore OSD and the pool ``rbd``; see the module docstring.

    Use as a context manager, or ``start()`` and ``stop()``. ``conf`` is the
    configuration file a client (``rbd``, librados, qemu-storage-daemon, fio) points at.
    """

    def __init__(self, memstore_bytes: int = 4 << 30) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="vb-ceph-", dir="/tmp"))
        self.conf = self.workdir / "ceph.conf"
        self.port = 0
        self.fsid = str(uuid.uuid4())
        self._memstore_bytes = memstore_bytes
        self.mon: subprocess.Popen[bytes] | None = None
        self.osd: subprocess.Popen[bytes] | None = None

    @property
    def mon_host(self) -> str:
        """The monitor's address, as ``mon_host`` takes it."""
        return f"127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        work = self.workdir
        self.conf.write_text(
            "[global]\n"
            f"fsid = {self.fsid}\n"
            f"mon host = v2:{self.mon_host}\n"
            "public network = 127.0.0.1/32\n"
            "auth cluster required = none\n"
            "auth service required = none\n"
            "auth client required = none\n"
            "osd pool default size = 1\n"
            "osd pool default min size = 1\n"
            "mon allow pool size one = true\n"
            "mon allow pool delete = true\n"
            "mon warn on pool no redundancy = false\n"
            "mon data avail warn = 1\n"
            "osd pool default pg autoscale mode = off\n"
            "osd crush chooseleaf type = 0\n"
            "osd objectstore = memstore\n"
            f"memstore device bytes = {self._memstore_bytes}\n"
            f"run dir = {work}\n"
            f"log file = {work}/$name.log\n"
            f"admin socket = {work}/$name.$pid.asok\n"
            f"mon data = {work}/mon.$id\n"
            f"osd data = {work}/osd.$id\n"
            "osd max object name len = 256\n"
            "osd max object namespace len = 64\n"
        )

    def start(self) -> CephCluster:
        """Create and start the cluster; returns once the pool ``rbd`` takes writes."""
        missing = [
            tool
            for tool in ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool")
            if shutil.which(tool) is None
        ]
        if missing:
            raise CephError(
                f"{', '.join(missing)} not installed "
                f"(apt-get install --no-install-recommends {' '.join(PACKAGES)})"
            )
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        self.port = _free_port()
        self._write_conf()
        monmap = self.workdir / "monmap"
        self._run(
            "monmaptool",
            "--create",
            "--add",
            "a",
            f"v2:{self.mon_host}",
            "--fsid",
            self.fsid,
            str(monmap),
        )
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "-c", str(self.conf))
        self.mon = self._daemon("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid, timeout=self._left(deadline)).strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new gave id {osd_id!r}, expected 0")
        (self.workdir / "osd.0").mkdir()
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "-c", str(self.conf))
        self.osd = self._daemon("ceph-osd", "-i", "0")
        self._wait_osd_up(deadline)
        self.ceph("osd", "pool", "create", POOL, "8", "8", timeout=self._left(deadline))
        self.ceph("osd", "pool", "application", "enable", POOL, "rbd", timeout=self._left(deadline))
        # The pool's placement groups peer in the background: an object written (with a
        # bounded wait) proves the pool takes I/O.
        self._tool(
            "rados", "-p", POOL, "put", "virtblk-probe", str(monmap), timeout=self._left(deadline)
        )
        self._tool("rados", "-p", POOL, "rm", "virtblk-probe", timeout=self._left(deadline))

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CephError(f"the cluster did not come up within {START_TIMEOUT:.0f} s")
        return left

    def _run(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a command to its end; its output, or ``CephError`` with its stderr (and the
        daemons' logs when it did not answer in time: a cluster that does not answer)."""
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CephError(
                f"{' '.join(argv)} did not answer within {timeout:.0f} s\n{self.logs()}"
            ) from None
        if result.returncode != 0:
            raise CephError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr or result.stdout}"
            )
        return result.stdout

    def _daemon(self, binary: str, *args: str) -> subprocess.Popen[bytes]:
        name = f"{binary.removeprefix('ceph-')}.{args[-1]}"
        with (self.workdir / f"{name}.out").open("wb") as out:
            return subprocess.Popen(
                [binary, "-f", "-c", str(self.conf), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def _tool(self, binary: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return self._run(binary, "-c", str(self.conf), *args, timeout=timeout)

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a ``ceph`` command on this cluster; returns its output."""
        return self._tool("ceph", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run an ``rbd`` command on this cluster; returns its output."""
        return self._tool("rbd", *args, timeout=timeout)

    def export(self, spec: str) -> bytes:
        """The image's bytes as the cluster holds them (``rbd export``), not as a device
        that serves it reads them."""
        path = self.workdir / f"export-{uuid.uuid4().hex[:12]}"
        self.rbd("export", "--no-progress", spec, str(path))
        try:
            return path.read_bytes()
        finally:
            path.unlink()

    def ceph_json(self, *args: str) -> Any:
        """A ``ceph`` command's JSON output, parsed."""
        return json.loads(self.ceph(*args, "--format", "json"))

    def _wait_osd_up(self, deadline: float) -> None:
        while True:
            assert self.osd is not None and self.mon is not None
            for name, daemon in (("ceph-mon", self.mon), ("ceph-osd", self.osd)):
                if daemon.poll() is not None:
                    raise CephError(f"{name} exited with status {daemon.returncode}\n{self.logs()}")
            if self.ceph_json("osd", "stat").get("num_up_osds") == 1:
                return
            self._left(deadline)
            time.sleep(0.2)

    def logs(self, lines: int = 30) -> str:
        """The last lines of each daemon's log, to explain a failure."""
        parts = []
        for log in sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("*.out")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def pause_osd(self) -> None:
        """Stop the OSD (SIGSTOP): the cluster keeps its data but answers no I/O."""
        assert self.osd is not None
        os.killpg(self.osd.pid, signal.SIGSTOP)

    def resume_osd(self) -> None:
        """Let a paused OSD go on (SIGCONT)."""
        assert self.osd is not None
        os.killpg(self.osd.pid, signal.SIGCONT)

    def stop(self) -> None:
        """End both daemons and remove the directory."""
        for daemon in (self.osd, self.mon):
            if daemon is not None:
                if daemon.poll() is None:
                    os.killpg(daemon.pid, signal.SIGCONT)  # a paused OSD must see SIGTERM
                kill_group(daemon)
        self.osd = self.mon = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
