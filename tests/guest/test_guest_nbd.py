"""A Linux guest whose disk lives behind an NBD server: QEMU's vhost-user-blk-pci and
Linux 6.1's virtio_blk on ``virtblk serve --nbd``, over ``qemu-nbd`` serving a raw file,
with two vCPUs and two queues (one NBD connection carries both).

The file holds random bytes before the boot, so the guest's first reads come from what the
host put there.  The guest then writes known patterns with O_DIRECT, two writers at once
(one pinned to each CPU, so each uses its own queue), over part of the seeded bytes, at
byte 512 and in the disk's last MiB, the last one fsync'ed (a FLUSH).  Once the guest has
powered off, and while the device and qemu-nbd still run, the file must hold exactly those
bytes: the seed with the patterns laid over it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.guest import GuestKernel, GuestResult, run_guest
from peers.nbd import QemuNbd
from peers.plugin import NbdServerFactory
from virtblk.device.control import send_command

pytestmark = pytest.mark.guest

MiB = 1 << 20
SIZE = 80 * MiB  # not a power of two, so a size taken from elsewhere would show
GUEST_TIMEOUT = 240

SEED_OFFSET = 32 * MiB  # random bytes written here by the host, read by the guest first
SEED_LENGTH = 8 * MiB


def pattern(text: str, length: int) -> bytes:
    """What ``yes TEXT | head -c LENGTH`` prints: the host's copy of a guest pattern."""
    line = f"{text}\n".encode()
    return (line * (length // len(line) + 1))[:length]


#: (name, offset, length, block size of its dd, its text).  No dd block is smaller than a
#: page (busybox's dd falls back to the page cache for a malloc'ed sub-page buffer).
WRITES = [
    ("cpu0", 2 * MiB, 4 * MiB, 64 * 1024, "virtblk nbd cpu0 ."),
    ("cpu1", SEED_OFFSET - 512 * 1024, MiB, 4096, "virtblk nbd cpu1 .."),
    ("unaligned", 512, 4096, 4096, "virtblk nbd unaligned ...."),
    ("tail", SIZE - MiB, MiB, MiB, "virtblk nbd tail ..."),
]
_W = {name: (offset, length, bs, text) for name, offset, length, bs, text in WRITES}


def _dd_write(name: str, extra: str = "") -> str:
    offset, length, bs, _ = _W[name]
    return (
        f"dd if=/tmp/{name} of=/dev/vda bs={bs} seek={offset} count={length // bs} "
        f"oflag=direct,seek_bytes{extra} 2>/tmp/err-{name} || {{ cat /tmp/err-{name}; exit 1; }}"
    )


SCRIPT = "\n".join([
    "set -e",
    "echo SIZE=$(cat /sys/block/vda/size)",
    "echo MQ=$(ls /sys/block/vda/mq | wc -l)",
    "echo SERIAL=$(cat /sys/block/vda/serial)",
    f"dd if=/dev/vda of=/tmp/seed bs=1M skip={SEED_OFFSET // MiB} count={SEED_LENGTH // MiB} "
    "iflag=direct 2>/dev/null",
    "echo SEED_MD5=$(md5sum /tmp/seed | cut -d' ' -f1)",
    *(f"yes '{text}' | head -c {length} > /tmp/{name}" for name, _, length, _, text in WRITES),
    f"taskset 0x1 sh -c '{_dd_write('cpu0')}' &",
    "A=$!",
    f"taskset 0x2 sh -c '{_dd_write('cpu1')}' &",
    "B=$!",
    "wait $A",
    "wait $B",
    _dd_write("unaligned"),
    _dd_write("tail", " conv=fsync"),
    "echo IOERRORS=$(dmesg | grep -c 'I/O error' || true)",
])  # fmt: skip


def _values(result: GuestResult) -> dict[str, str]:
    """``KEY=value`` lines the guest script printed."""
    return dict(re.findall(r"^([A-Z_0-9]+)=(.*)$", result.output, re.MULTILINE))


def test_guest_writes_land_in_the_file_behind_qemu_nbd(
    guest_kernel: GuestKernel, nbd_server: NbdServerFactory, tmp_path: Path, sock_dir: Path,
) -> None:
    content = bytearray(SIZE)
    content[SEED_OFFSET:SEED_OFFSET + SEED_LENGTH] = os.urandom(SEED_LENGTH)
    image = tmp_path / "guest.raw"
    image.write_bytes(content)
    server = nbd_server(QemuNbd, image, export="guest-disk")
    control = sock_dir / "ctl.sock"
    args = ["--nbd", server.uri, "--num-queues", "2", "--control", str(control)]
    with ServeProcess(sock_dir / "vb.sock", args) as device:
        result = run_guest(SCRIPT, disks=[str(device.socket_path)], num_queues=2, smp=2,
                           timeout=GUEST_TIMEOUT, kernel=guest_kernel)  # fmt: skip
        assert result.rc == 0, (
            f"guest script exited {result.rc}\n--- guest output ---\n{result.output}\n"
            f"--- console tail ---\n{chr(10).join(result.console.splitlines()[-30:])}\n"
            f"--- virtblk serve ---\n{device.output}"
        )
        # The guest is gone, the device and qemu-nbd still run: the file holds what the
        # guest's writes and its FLUSH made durable, not what a close wrote.
        on_disk = image.read_bytes()
        queues = send_command(control, "stats")["stats"]["queues"]
        assert device.terminate() == 0, device.output
    assert [q["requests"].get("OUT", 0) > 0 for q in queues] == [True, True], queues
    # Exactly the bytes dd wrote reached the device (nothing through the page cache).
    assert sum(q["bytes_written"] for q in queues) == sum(w[2] for w in WRITES), queues
    values = _values(result)
    assert values["SIZE"] == str(SIZE // 512)
    assert values["MQ"] == "2"
    assert values["SERIAL"] == "guest-disk"
    assert values["SEED_MD5"] == hashlib.md5(
        content[SEED_OFFSET:SEED_OFFSET + SEED_LENGTH]).hexdigest()
    assert values["IOERRORS"] == "0", result.console
    expected = content
    for _, offset, length, _, text in WRITES:
        expected[offset:offset + length] = pattern(text, length)
    if on_disk != expected:
        wrong = [i for i in range(0, SIZE, 512) if on_disk[i:i + 512] != expected[i:i + 512]]
        pytest.fail(f"{len(wrong)} sectors differ in the file, the first at byte "
                    f"{wrong[0]}; guest output:\n{result.output}")
