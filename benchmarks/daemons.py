"""The devices the benchmarks drive, each started in its own process.

Every helper is a context manager that starts the device, waits until its vhost-user
socket exists, yields ``(socket path, pid)`` (the pid is how a benchmark reads the
device's CPU time from /proc) and stops the process on the way out.  One place for this so
that every benchmark starts a given device the same way.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SIZE = 1 << 30
"""The size of the null devices."""


def cpu_model() -> str:
    """The CPU's name, for the machine a benchmark's record was made on."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(argv: list[str], sock: Path, what: str) -> Iterator[tuple[str, int]]:
    """Run ``argv`` until the ``with`` block ends; yields (socket, pid) once ``sock``
    exists."""
    proc = subprocess.Popen(argv)
    try:
        _wait_for_socket(sock, proc, what)
        yield str(sock), proc.pid
    finally:
        proc.terminate()
        proc.wait()


def qemu_storage_daemon(
    tmp: Path, num_queues: int = 1
) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """qemu-storage-daemon exporting a null-co device that reads zeroes (as our
    NullBackend does)."""
    sock = tmp / "qsd.sock"
    return serving(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=null-co,node-name=f,size={SIZE},read-zeroes=on",
            "--export",
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues={num_queues}",
        ],
        sock,
        "qemu-storage-daemon",
    )


def qsd_file(image: Path, tmp: Path) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """qemu-storage-daemon exporting ``image`` (native AIO, O_DIRECT)."""
    sock = tmp / "qsd-file.sock"
    return serving(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={image},cache.direct=on,aio=native",
            "--export",
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on",
        ],
        sock,
        "qemu-storage-daemon",
    )


def virtblk_serve(tmp: Path, num_queues: int = 1) -> contextlib.AbstractContextManager[
    tuple[str, int]
]:
    """``virtblk serve --null``."""
    sock = tmp / "virtblk.sock"
    return serving(
        [
            sys.executable,
            "-m",
            "virtblk",
            "serve",
            "--socket",
            str(sock),
            "--null",
            str(SIZE),
            "--num-queues",
            str(num_queues),
        ],
        sock,
        "virtblk serve",
    )
