"""``unixsock``'s errors say each thing once: the message of an ``OSError(errno, text)`` is
printed after ``[Errno N]``, so a text that embeds the original error repeats it, and one
given a filename too prints the path a second time after the text."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from virtblk import unixsock


def assert_errno_once(exc: OSError, code: int, path: str) -> None:
    """One ``[Errno N]`` and one reason in the printed error, which names the path."""
    text = str(exc)
    assert exc.errno == code
    assert text.count(f"[Errno {code}]") == 1, text
    assert text.count(os.strerror(code)) == 1, text
    assert path in text


def test_a_socket_that_cannot_be_probed(tmp_path: Path) -> None:
    """A datagram socket bound at the path: the stream probe's connect fails with
    EPROTOTYPE, neither "refused" (stale) nor accepted (live), so the file is kept."""
    path = str(tmp_path / "dgram.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        dgram.bind(path)
        with pytest.raises(OSError) as info:
            unixsock.clear_stale(path)
        assert_errno_once(info.value, errno.EPROTOTYPE, path)
        assert "cannot probe existing socket" in str(info.value)
        assert os.path.exists(path)


def test_a_server_with_a_full_backlog_is_not_replaced(tmp_path: Path) -> None:
    """A live server whose listen backlog is full: the probe's connect (with a timeout, so
    non-blocking underneath) fails with EAGAIN, and the socket file stays."""
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(0)
        clients: list[socket.socket] = []
        try:
            for _ in range(64):  # Linux queues backlog + 1 connections
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                try:
                    client.connect(path)
                except BlockingIOError:
                    break
            else:
                pytest.fail("the listen backlog never filled")
            with pytest.raises(OSError) as info:
                unixsock.clear_stale(path)
            assert_errno_once(info.value, errno.EAGAIN, path)
            assert os.path.exists(path)
        finally:
            for client in clients:
                client.close()


def test_a_missing_socket_cannot_be_connected(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(OSError) as info:
        unixsock.connect(path, timeout=1.0)
    assert_errno_once(info.value, errno.ENOENT, path)


def test_a_live_server_is_refused_naming_its_path_once(tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with pytest.raises(OSError) as info:
            unixsock.clear_stale(path)
    text = str(info.value)
    assert info.value.errno == errno.EADDRINUSE
    assert text.count(f"[Errno {errno.EADDRINUSE}]") == 1 and text.count(path) == 1, text


def test_a_file_that_is_not_a_socket_is_refused_naming_its_path_once(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"data")
    with pytest.raises(FileExistsError) as info:
        unixsock.clear_stale(str(path))
    assert str(info.value).count(str(path)) == 1, str(info.value)
    assert path.read_bytes() == b"data"


def test_connect_takes_a_path_like(tmp_path: Path) -> None:
    """``Disk.connect(Path(...))`` dials through here: a ``pathlib.Path`` is as good as its
    text (it raised TypeError before)."""
    path = tmp_path / "listening.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        client = unixsock.connect(path, 5.0)
        with client, server.accept()[0] as accepted:
            client.sendall(b"x")
            assert accepted.recv(1) == b"x"
