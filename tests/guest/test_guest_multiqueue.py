"""A Linux guest with two vCPUs and num-queues=2 on our device: two hardware queues, and two
concurrent writers (one pinned to each CPU, so each uses its own queue) whose data is intact
in the guest and in the image on the host."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.guest import run_guest

MiB = 1 << 20
REGION = 4 * MiB  # each writer owns one region


@pytest.fixture
def served_image(sock_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    sock = sock_dir / "vb.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtblk", "serve", "--socket", str(sock), "--file", str(image),
         "--num-queues", "2"],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "virtblk serve did not create its socket"
        time.sleep(0.05)
    yield image, sock
    proc.terminate()
    assert proc.wait(20) == 0


N = REGION // 65536  # 64 KiB blocks per region
SCRIPT = f"""
set -e
echo "queues=$(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null
taskset 0x1 dd if=/tmp/a of=/dev/vda bs=64k seek=0 oflag=direct 2>/dev/null &
A=$!
taskset 0x2 dd if=/tmp/b of=/dev/vda bs=64k seek={N} oflag=direct 2>/dev/null &
B=$!
wait $A
wait $B
dd if=/dev/vda of=/tmp/ra bs=64k skip=0 count={N} iflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/rb bs=64k skip={N} count={N} iflag=direct 2>/dev/null
cmp /tmp/a /tmp/ra
cmp /tmp/b /tmp/rb
echo "md5a=$(md5sum /tmp/a | cut -d' ' -f1)"
echo "md5b=$(md5sum /tmp/b | cut -d' ' -f1)"
echo "inflight=$(cat /sys/block/vda/inflight)"
"""


@pytest.mark.guest
def test_two_queues_two_concurrent_writers(served_image: tuple[Path, Path]) -> None:
    image, sock = served_image
    result = run_guest(SCRIPT, disks=[str(sock)], num_queues=2, smp=2, timeout=180)
    assert result.rc == 0, result.output
    values = dict(
        line.split("=", 1) for line in result.output.splitlines() if "=" in line
    )
    assert values["queues"] == "2"
    data = image.read_bytes()
    assert hashlib.md5(data[:REGION]).hexdigest() == values["md5a"]
    assert hashlib.md5(data[REGION : 2 * REGION]).hexdigest() == values["md5b"]
