"""A Linux guest whose disk lives in Ceph: QEMU's vhost-user-blk-pci and Linux 6.1's
virtio_blk on ``virtblk serve --rbd``, with two vCPUs and two queues.

The image is filled through ``rbd import`` before the boot, so the guest's first reads
come from RADOS objects that Ceph's own tool wrote.  The guest then writes known patterns
with O_DIRECT, two writers at once (one pinned to each CPU, so each uses its own queue),
across RADOS object boundaries (4 MiB), over part of the imported data, at an odd sector
and in the disk's last MiB; the last write is made durable with fsync (a FLUSH).  Once the
guest has powered off, and while the device still runs, ``rbd export`` must show exactly
those bytes: the imported content with the patterns laid over it.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.ceph import POOL, CephCluster
from peers.guest import GuestKernel, GuestResult, run_guest
from virtblk.device.control import send_command

pytestmark = pytest.mark.guest

MiB = 1 << 20
SIZE = 96 * MiB  # not a power of two, so a size taken from elsewhere would show
GUEST_TIMEOUT = 240

SEED_OFFSET = 32 * MiB  # random bytes imported here, read by the guest first
SEED_LENGTH = 8 * MiB


def pattern(text: str, length: int) -> bytes:
    """What ``yes TEXT | head -c LENGTH`` prints: the host's copy of a guest pattern.  Each
    line is a length that divides no sector, so a write in the wrong place shows."""
    line = f"{text}\n".encode()
    return (line * (length // len(line) + 1))[:length]


#: (name, offset, length, block size of the dd that writes it, its text).  cpu0 crosses
#: the object boundary at 4 MiB with 64 KiB requests; cpu1 rewrites the last 512 KiB
#: before the imported bytes and their first 512 KiB (part of an object that holds data)
#: with 4 KiB requests; "unaligned" is one 4 KiB write at byte 512 (sectors 1-8, across a
#: page boundary); "tail" is the disk's last MiB in one 1 MiB write, fsync'ed (a FLUSH).
#: No dd block is smaller than a page: busybox's dd takes a buffer that small from malloc,
#: unaligned, and when the O_DIRECT write fails (EINVAL) it quietly clears O_DIRECT and
#: writes through the page cache (a 512-byte write became a 4 KiB read and write at 0).
WRITES = [
    ("cpu0", 2 * MiB, 4 * MiB, 64 * 1024, "virtblk rbd cpu0 ."),
    ("cpu1", SEED_OFFSET - 512 * 1024, MiB, 4096, "virtblk rbd cpu1 .."),
    ("unaligned", 512, 4096, 4096, "virtblk rbd unaligned ...."),
    ("tail", SIZE - MiB, MiB, MiB, "virtblk rbd tail ..."),
]
_W = {name: (offset, length, bs, text) for name, offset, length, bs, text in WRITES}


def _dd_write(name: str, extra: str = "") -> str:
    offset, length, bs, _ = _W[name]
    return (
        f"dd if=/tmp/{name} of=/dev/vda bs={bs} seek={offset} count={length // bs} "
        f"oflag=direct,seek_bytes{extra} 2>/tmp/err-{name} || {{ cat /tmp/err-{name}; exit 1; }}"
    )


def _dd_readback(name: str) -> str:
    offset, length, bs, _ = _W[name]
    return (
        f"dd if=/dev/vda of=/tmp/back-{name} bs={bs} skip={offset} count={length // bs} "
        f"iflag=direct,skip_bytes 2>/dev/null\n"
        f"cmp /tmp/{name} /tmp/back-{name}\necho READBACK_{name.upper()}=ok"
    )


SCRIPT = "\n".join([
    "set -e",
    "echo SIZE=$(cat /sys/block/vda/size)",
    "echo MQ=$(ls /sys/block/vda/mq | wc -l)",
    "echo RO=$(cat /sys/block/vda/ro)",
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
    *(_dd_readback(name) for name, *_ in WRITES),
    "echo IOERRORS=$(dmesg | grep -c 'I/O error' || true)",
])  # fmt: skip


def _values(result: GuestResult) -> dict[str, str]:
    """``KEY=value`` lines the guest script printed."""
    return dict(re.findall(r"^([A-Z_0-9]+)=(.*)$", result.output, re.MULTILINE))


@pytest.fixture
def imported(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[tuple[str, bytearray]]:
    """A ``SIZE`` image whose content (zeros, random bytes at ``SEED_OFFSET``) came in
    through ``rbd import``; its ``POOL/NAME`` and that content."""
    content = bytearray(SIZE)
    content[SEED_OFFSET : SEED_OFFSET + SEED_LENGTH] = os.urandom(SEED_LENGTH)
    source = tmp_path / "source"
    source.write_bytes(content)
    spec = f"{POOL}/g{uuid.uuid4().hex[:12]}"
    ceph_cluster.rbd("import", "--no-progress", str(source), spec)
    source.unlink()
    yield spec, content
    ceph_cluster.rbd("rm", "--no-progress", spec)


def test_guest_writes_land_in_ceph(
    guest_kernel: GuestKernel, ceph_cluster: CephCluster, imported: tuple[str, bytearray],
    sock_dir: Path,
) -> None:  # fmt: skip
    spec, content = imported
    control = sock_dir / "ctl.sock"
    args = ["--rbd", spec, "--ceph-conf", str(ceph_cluster.conf), "--num-queues", "2",
            "--control", str(control)]  # fmt: skip
    with ServeProcess(sock_dir / "vb.sock", args) as server:
        result = run_guest(SCRIPT, disks=[str(server.socket_path)], num_queues=2, smp=2,
                           timeout=GUEST_TIMEOUT, kernel=guest_kernel)  # fmt: skip
        assert result.rc == 0, (
            f"guest script exited {result.rc}\n--- guest output ---\n{result.output}\n"
            f"--- console tail ---\n{chr(10).join(result.console.splitlines()[-30:])}\n"
            f"--- virtblk serve ---\n{server.output}"
        )
        # The guest is gone and the device still holds the image open: what Ceph has now
        # is what the guest's writes and its FLUSH made durable, not what a close wrote.
        image = ceph_cluster.export(spec)
        queues = send_command(control, "stats")["stats"]["queues"]
        assert server.terminate() == 0, server.output
    # Each writer was pinned to a CPU, and each CPU has a queue of its own.
    assert [q["requests"].get("OUT", 0) > 0 for q in queues] == [True, True], queues
    # The device received exactly the bytes dd wrote: nothing went through the guest's
    # page cache (which writes whole pages, after reading them).
    assert sum(q["bytes_written"] for q in queues) == sum(w[2] for w in WRITES), queues
    values = _values(result)
    assert values["SIZE"] == str(SIZE // 512)
    assert values["MQ"] == "2"
    assert values["RO"] == "0"
    assert (
        values["SEED_MD5"]
        == hashlib.md5(content[SEED_OFFSET : SEED_OFFSET + SEED_LENGTH]).hexdigest()
    )
    for name, *_ in WRITES:
        assert values[f"READBACK_{name.upper()}"] == "ok"
    assert values["IOERRORS"] == "0", result.console
    expected = content
    for _, offset, length, _, text in WRITES:
        expected[offset : offset + length] = pattern(text, length)
    assert len(image) == SIZE
    if image != expected:
        wrong = [i for i in range(0, SIZE, 512) if image[i : i + 512] != expected[i : i + 512]]
        pytest.fail(
            f"{len(wrong)} sectors differ in the exported image, the first at "
            f"byte {wrong[0]}; guest output:\n{result.output}"
        )
