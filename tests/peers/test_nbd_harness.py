"""The NBD servers of the harness (peers/nbd.py), proved with the NBD tools themselves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from peers.nbd import NbdkitMemory, NbdServerError, QemuNbd
from peers.plugin import NbdServerFactory
from peers.process import process_state

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _nbdinfo(uri: str, *args: str) -> str:
    return subprocess.run(["nbdinfo", *args, uri], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_qemu_nbd_serves_the_file_and_comes_back_after_a_kill(
    nbd_server: NbdServerFactory, tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    data = os.urandom(MiB)
    image.write_bytes(data)
    server = nbd_server(QemuNbd, image, export="e1", tcp=True)
    assert server.uri.startswith("nbd://127.0.0.1:") and server.uri.endswith("/e1")
    assert _nbdinfo(server.uri, "--size").strip() == str(MiB)
    assert server.read_all() == data  # --persistent: still there after a client left
    assert server.process is not None
    first = server.process.pid
    server.kill()
    assert process_state(first) is None
    server.start()
    assert server.read_all() == data


def test_nbdkit_memory_takes_filters_and_logs_requests(nbd_server: NbdServerFactory) -> None:
    server = nbd_server(NbdkitMemory, 4 * MiB, log_requests=True, read_only=True,
                        filters=["blocksize-policy"], params=["blocksize-maximum=65536"])
    assert isinstance(server, NbdkitMemory)
    info = _nbdinfo(server.uri)
    assert "is_read_only: true" in info and "block_size_maximum: 65536" in info
    assert server.read_all() == bytes(4 * MiB)
    # nbdinfo was connection 1, nbdcopy connection 2: its reads are logged there.
    assert server.requests(2) and all(line.startswith(("Read ", "Extents "))
                                      for line in server.requests(2))


def test_a_server_that_cannot_start_says_why(sock_dir: Path) -> None:
    server = QemuNbd(sock_dir / "missing.raw", sock_dir / "q.sock")
    with pytest.raises(NbdServerError, match=r"(?s)exited with status 1.*missing\.raw"):
        server.start()
    server.close()


def test_socket_or_tcp_not_both(sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        NbdkitMemory(MiB, sock_dir / "x.sock", tcp=True)
