"""The packed ring with the real peer: Linux 6.1 under QEMU 7.2 with
``vhost-user-blk-pci,packed=on,num-queues=2`` and ``-smp 2``, whose disk is
``virtblk serve``.

With the device's default (RING_PACKED offered) the guest negotiates the packed ring (its
virtio device's ``features``, a string of 0/1 characters, has '1' at bit 34), two
O_DIRECT writers pinned one to each vCPU land in the image byte for byte, each queue
carrying one writer's requests, and O_DIRECT reads of data the host put in the image
before the guest booted match it.  Both kinds of queue workers (threads, processes) are
run.  ``serve --no-packed`` hides the feature: the same guest, packed=on in QEMU, falls
back to the split ring (bit 34 '0') and works the same.

A restart of ``virtblk serve`` under a packed-ring guest is survived: QEMU 7.2 keeps no
packed ring position across a backend crash (it sends the initial base again), but the
in-flight buffer's packed journal says where the ring is; the last test restarts the
device under a writer and sees it go on.  (``test_guest_device_restart.py`` SIGKILLs the
device with requests in flight, over packed rings too.)
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.guest import run_guest, start_guest
from virtblk.device.control import send_command

pytestmark = pytest.mark.guest

MiB = 1 << 20
REGION = 4 * MiB  # each writer owns one region; the seeded data is a third
# Different request sizes per writer, so a queue's (requests, bytes) names its writer.
A_BLOCK = 64 * 1024
B_BLOCK = 4096
RING_PACKED_BIT = 34


def _seed() -> bytes:
    """What the host writes into the third region before the guest boots."""
    return hashlib.sha256(b"packed").digest() * (REGION // 32)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB image whose third region holds ``_seed()``."""
    path = tmp_path / "disk.img"
    data = bytearray(16 * MiB)
    data[2 * REGION : 3 * REGION] = _seed()
    path.write_bytes(data)
    return path


Serve = Callable[..., tuple[ServeProcess, Path]]


@pytest.fixture
def serve(sock_dir: Path, image: Path) -> Iterator[Serve]:
    """Start ``virtblk serve`` on ``image`` with two queues and a control socket, with the
    extra arguments given; the server and its control socket (stopped after the test)."""
    with contextlib.ExitStack() as stack:

        def start(*extra: str) -> tuple[ServeProcess, Path]:
            control = sock_dir / "ctl.sock"
            args = ["--file", str(image), "--num-queues", "2", "--control", str(control),
                    *extra]
            return stack.enter_context(ServeProcess(sock_dir / "vb.sock", args)), control

        yield start


N = REGION // A_BLOCK
SCRIPT = f"""
set -e
echo "features=$(cat /sys/block/vda/device/features)"
echo "queues=$(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null
taskset 0x1 dd if=/tmp/a of=/dev/vda bs={A_BLOCK} seek=0 oflag=direct 2>/dev/null &
A=$!
taskset 0x2 dd if=/tmp/b of=/dev/vda bs={B_BLOCK} seek={REGION // B_BLOCK} oflag=direct \\
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
echo "md5seed=$(dd if=/dev/vda bs=64k skip={2 * N} count={N} iflag=direct 2>/dev/null \\
    | md5sum | cut -d' ' -f1)"
if dmesg | grep -q 'I/O error'; then echo "dmesg: I/O error"; exit 1; fi
"""


def _run(server: ServeProcess, control: Path, image: Path) -> str:
    """Boot the packed=on guest on ``server``, check the data; the guest's negotiated
    features (the device's stats no longer say which ring it was: the session ended with
    the guest)."""
    result = run_guest(SCRIPT, disks=[str(server.socket_path)], num_queues=2, smp=2,
                       device_options=["packed=on"], timeout=240)
    assert result.rc == 0, f"{result.output}\n--- virtblk serve ---\n{server.output}"
    values = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
    assert values["queues"] == "2"
    data = image.read_bytes()
    assert hashlib.md5(data[:REGION]).hexdigest() == values["md5a"]
    assert hashlib.md5(data[REGION : 2 * REGION]).hexdigest() == values["md5b"]
    assert hashlib.md5(_seed()).hexdigest() == values["md5seed"]
    assert data[2 * REGION : 3 * REGION] == _seed()
    stats = send_command(control, "stats")["stats"]
    queues = stats["queues"]
    # Which CPU maps to which queue is the guest's choice; that each writer had one queue
    # to itself is not.
    writes = sorted((q["requests"].get("OUT", 0), q["bytes_written"]) for q in queues)
    assert writes == [(REGION // A_BLOCK, REGION), (REGION // B_BLOCK, REGION)], queues
    assert stats["malformed"] == stats["chain_errors"] == 0
    return values["features"]


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_guest_negotiates_the_packed_ring(serve: Serve, image: Path, workers: str) -> None:
    server, control = serve("--workers", workers)
    features = _run(server, control, image)
    assert features[RING_PACKED_BIT] == "1", features


def test_no_packed_falls_back_to_split(serve: Serve, image: Path) -> None:
    server, control = serve("--no-packed")
    features = _run(server, control, image)
    assert features[RING_PACKED_BIT] == "0", features
    config = send_command(control, "get-config")
    assert "RING_PACKED" not in config["features_offered"]


WRITER = """
i=0
while [ $i -lt 1000 ]; do
    dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=$i oflag=direct 2>/dev/null
    echo "W $i"
    i=$((i + 1))
    sleep 0.2
done
"""


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout:.0f} s")
        time.sleep(0.2)


def test_a_restart_under_a_packed_guest_resumes(sock_dir: Path, image: Path) -> None:
    """The guest writes (packed ring, QEMU reconnect=1); ``virtblk serve`` is stopped and a
    new one started on the same socket: QEMU reconnects and starts the ring at its initial
    position, the new device resumes where the in-flight buffer says the ring is, and the
    guest's writes go on (before the packed journal, they stalled here)."""
    args = ["--file", str(image), "--workers", "thread"]
    with start_guest(WRITER, disks=[str(sock_dir / "vb.sock")], device_options=["packed=on"],
                     reconnect=1) as guest:
        with ServeProcess(sock_dir / "vb.sock", args):
            _wait_for(lambda: "W 5\n" in guest.console(), 120, "sixth write from the guest")
        before = guest.console().count("\nW ")  # no device: nothing written meanwhile
        with ServeProcess(sock_dir / "vb.sock", args) as second:
            _wait_for(lambda: guest.console().count("\nW ") >= before + 10, 60,
                      "ten more writes from the guest after the restart")
            assert "will not resume" not in second.output
