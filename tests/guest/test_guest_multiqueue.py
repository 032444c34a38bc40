"""A Linux guest with two vCPUs and num-queues=2 on our device: two hardware queues, and two
concurrent writers, one pinned to each CPU, so each uses its own queue.  Their data is
intact in the guest and in the image on the host, and the device's per-queue counters show
that each queue carried exactly one writer's requests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.guest import run_guest
from virtblk.device.control import send_command

MiB = 1 << 20
REGION = 4 * MiB  # each writer owns one region
# The writers use different request sizes, so a queue's (requests, bytes) names its
# writer: a queue that carried some of each could not show either pair below.
A_BLOCK = 64 * 1024
B_BLOCK = 4096


@pytest.fixture
def served_image(sock_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, ServeProcess, Path]]:
    """An image served with two queues, the server, and its control socket."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    control = sock_dir / "ctl.sock"
    args = ["--file", str(image), "--num-queues", "2", "--control", str(control)]
    with ServeProcess(sock_dir / "vb.sock", args) as server:
        yield image, server, control


N = REGION // A_BLOCK  # 64 KiB blocks per region
SCRIPT = f"""
set -e
echo "queues=$(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null
taskset 0x1 dd if=/tmp/a of=/dev/vda bs={A_BLOCK} seek=0 oflag=direct 2>/dev/null &
A=$!
taskset 0x2 dd if=/tmp/b of=/dev/vda bs={B_BLOCK} seek={REGION // B_BLOCK} oflag=direct \
    2>/dev/null &
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
def test_two_queues_two_concurrent_writers(
    served_image: tuple[Path, ServeProcess, Path],
) -> None:
    image, server, control = served_image
    result = run_guest(SCRIPT, disks=[str(server.socket_path)], num_queues=2, smp=2,
                       timeout=180)
    assert result.rc == 0, f"{result.output}\n--- virtblk serve ---\n{server.output}"
    values = dict(
        line.split("=", 1) for line in result.output.splitlines() if "=" in line
    )
    assert values["queues"] == "2"
    data = image.read_bytes()
    assert hashlib.md5(data[:REGION]).hexdigest() == values["md5a"]
    assert hashlib.md5(data[REGION : 2 * REGION]).hexdigest() == values["md5b"]
    # Nothing else writes: no file system, and the readbacks are reads.  Which CPU maps to
    # which queue is the guest's choice; that each writer had one queue to itself is not.
    queues = send_command(control, "stats")["stats"]["queues"]
    writes = sorted((q["requests"].get("OUT", 0), q["bytes_written"]) for q in queues)
    assert writes == [(REGION // A_BLOCK, REGION), (REGION // B_BLOCK, REGION)], queues
