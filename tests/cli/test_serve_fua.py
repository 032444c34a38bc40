"""`virtblk serve --experimental-fua` offers OUT_FUA; a driver that opts in writes with FUA."""

from __future__ import annotations

import os
from pathlib import Path

from interop.serve_process import ServeProcess
from virtblk import Disk


def test_fua_write_through_serve(sock_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    sock = sock_dir / "fua.sock"
    data = os.urandom(4096)
    with ServeProcess(sock, ["--file", str(image), "--experimental-fua"]):
        with Disk.connect(str(sock), experimental_fua=True) as d:
            assert "BLK_OUT_FUA" in d.features
            d.pwrite(data, 8192, fua=True)
        with Disk.connect(str(sock)) as d:
            assert "BLK_OUT_FUA" not in d.features  # not negotiated unless asked for
    assert image.read_bytes()[8192 : 8192 + 4096] == data
