"""`virtblk info` shows a zoned device's characteristics, and `-` for a regular one."""

from __future__ import annotations

import json
from pathlib import Path

from interop.serve_process import ServeProcess, run_virtblk


def test_info_reports_zoned_characteristics(sock_dir: Path) -> None:
    sock = sock_dir / "z.sock"
    with ServeProcess(sock, ["--memory", "64M", "--zoned", "--zone-size", "4M"]):
        out = run_virtblk("info", str(sock), "--json")
    assert out.returncode == 0, out.stderr
    zoned = json.loads(out.stdout)["zoned"]
    assert zoned["model"] == "HM"
    assert zoned["zone_size"] == 4 << 20
    assert zoned["nr_zones"] == 16


def test_info_on_a_regular_device_says_not_zoned(sock_dir: Path) -> None:
    sock = sock_dir / "r.sock"
    with ServeProcess(sock, ["--memory", "16M"]):
        text = run_virtblk("info", str(sock))
        data = run_virtblk("info", str(sock), "--json")
    assert json.loads(data.stdout)["zoned"] is None
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("zoned"))
    assert line.split()[-1] == "-"
