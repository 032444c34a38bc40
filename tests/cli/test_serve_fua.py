"""`virtblk serve --experimental-fua` offers OUT_FUA; a driver that opts in writes with FUA."""

from __future__ import annotations

import os
from pathlib import Path

from interop.serve_process import ServeProcess
from virtblk import Disk
from virtblk.device.control import send_command


def test_fua_write_through_serve(sock_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    sock = sock_dir / "fua.sock"
    control = sock_dir / "ctl.sock"
    data = os.urandom(4096)

    def requests() -> dict[str, int]:
        answer = send_command(control, "stats")
        assert answer["ok"], answer
        return dict(answer["stats"]["requests"])

    with ServeProcess(sock, ["--file", str(image), "--experimental-fua",
                             "--control", str(control)]):
        with Disk.connect(str(sock), experimental_fua=True) as d:
            assert "BLK_OUT_FUA" in d.features
            d.pwrite(data, 8192, fua=True)
            # The device saw the type on the wire: a FUA write, not a plain one.  (Asked
            # while connected: the queue's worker answers for its own counters.)
            assert requests() == {"OUT_FUA": 1}
        with Disk.connect(str(sock)) as d:
            assert "BLK_OUT_FUA" not in d.features  # not negotiated unless asked for
            d.pwrite(data, 16384)
            assert requests() == {"OUT_FUA": 1, "OUT": 1}
    assert image.read_bytes()[8192 : 8192 + 4096] == data
