"""Private listening Unix sockets: for the vhost-user server and the control socket.

Both are created mode 0600 (whoever can connect can read the disk or resize it), replace a
stale socket file left by a crashed server but refuse a live one, and on close remove the
file only if it is still theirs (a later server may have replaced it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time

log = logging.getLogger("virtblk.unixsock")

SocketId = tuple[int, int]
"""(st_dev, st_ino) of the socket file we bound."""


def clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a non-socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: its server is gone
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot probe existing socket {path}: {exc.strerror}"
            ) from exc
        else:
            raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("replaced stale socket file %s", path)


def bind_private(path: str, backlog: int) -> tuple[socket.socket, SocketId]:
    """A listening socket at ``path``, mode 0600 from the start, and the file's identity."""
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o177)  # never visible with wider permissions, even briefly
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        info = os.lstat(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, (info.st_dev, info.st_ino)


def remove_if_ours(path: str, socket_id: SocketId) -> None:
    """Unlink ``path`` if it is still the socket file we bound."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == socket_id:
            os.unlink(path)


def connect(path: str | os.PathLike[str], timeout: float) -> socket.socket:
    """A stream socket connected to ``path`` (blocking, no timeout set on it).

    A Unix socket with a timeout does not wait for room in a full listen backlog (a
    one-at-a-time server busy with another session): that is retried until ``timeout``.
    Failures raise OSError with the path in the message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(os.fspath(path))
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            sock.close()
            raise OSError(
                errno.ETIMEDOUT,
                f"cannot connect to {path}: its listen backlog stayed full for {timeout} s",
            ) from None
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot connect to {path}: {exc.strerror}") from exc
    sock.settimeout(None)
    return sock
