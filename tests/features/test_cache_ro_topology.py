"""Read-only, cache mode, topology and geometry, on both sides, with the real peers.

Our device is ``virtblk serve`` (a process, with ``--control`` to watch it); our driver
is ``Disk``; qemu-storage-daemon 7.2 is the other device; a Linux 6.1 guest behind
QEMU's vhost-user-blk frontend is the other driver.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from peers.guest import GuestKernel, run_guest
from peers.process import eventually
from peers.qsd import QemuStorageDaemon
from virtblk import Disk
from virtblk.device.control import send_command
from virtblk.driver.virtio_blk import Geometry, Topology
from virtblk.errors import BlockIOError

MiB = 1 << 20


def serve(sock_dir: Path, *args: str) -> ServeProcess:
    """``virtblk serve`` with a control socket at ``sock_dir/ctl.sock``."""
    return ServeProcess(sock_dir / "blk.sock", [*args, "--control", str(sock_dir / "ctl.sock")])


def ctl(sock_dir: Path, command: str, **arguments: object) -> dict[str, object]:
    answer = send_command(sock_dir / "ctl.sock", command, **arguments)
    assert answer["ok"], answer
    return answer


def requests(sock_dir: Path) -> dict[str, int]:
    stats = ctl(sock_dir, "stats")["stats"]
    assert isinstance(stats, dict)
    return dict(stats["requests"])


# -- read-only ------------------------------------------------------------------------------


def test_read_only_device_refuses_every_write_up_front(sock_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\x42" * (4 * MiB))
    with serve(sock_dir, "--file", str(image), "--read-only") as sp, \
            Disk.connect(str(sp.socket_path)) as disk:
        assert disk.read_only and "BLK_RO" in disk.features
        attempts: list[Callable[[], object]] = [
            lambda: disk.pwrite(bytes(512), 0),
            lambda: disk.discard(0, 4096),
            lambda: disk.write_zeroes(0, 4096),
            lambda: disk.secure_erase(0, 4096),
        ]
        for attempt in attempts:
            with pytest.raises(BlockIOError) as info:
                attempt()
            assert info.value.errno == errno.EROFS and "read-only" in str(info.value)
        assert disk.pread(512, 0) == b"\x42" * 512
        # Refused by the driver: the device never saw a write.
        assert requests(sock_dir) == {"IN": 1}
        refused = send_command(sock_dir / "ctl.sock", "set-read-only", read_only=False)
        assert not refused["ok"] and "backend is read-only" in str(refused["error"])
    assert image.read_bytes() == b"\x42" * (4 * MiB)


def test_runtime_read_only_fails_writes_with_eio(sock_dir: Path) -> None:
    with serve(sock_dir, "--memory", "4M") as sp, Disk.connect(str(sp.socket_path)) as disk:
        disk.pwrite(b"\x11" * 4096, 0)
        answer = ctl(sock_dir, "set-read-only", read_only=True)
        assert answer["read_only"] and answer["frontend_connected"]
        # The RO feature bit was fixed at negotiation: the driver still thinks it may write.
        assert not disk.read_only
        for attempt in (lambda: disk.pwrite(b"\x22" * 4096, 0),
                        lambda: disk.write_zeroes(0, 4096),
                        lambda: disk.discard(0, 4096)):
            with pytest.raises(BlockIOError) as info:
                attempt()
            assert info.value.errno == errno.EIO
        assert disk.pread(4096, 0) == b"\x11" * 4096
        errors = ctl(sock_dir, "stats")["stats"]
        assert isinstance(errors, dict) and errors["errors"]["IOERR"] == 3
        ctl(sock_dir, "set-read-only", read_only=False)
        disk.pwrite(b"\x33" * 4096, 0)
        assert disk.pread(4096, 0) == b"\x33" * 4096


@pytest.mark.interop
def test_qsd_read_only_export(qsd_factory: Callable[..., QemuStorageDaemon],
                              tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    qsd = qsd_factory(image=image, writable=False)
    with Disk.connect(str(qsd.socket_path)) as disk:
        assert disk.read_only
        with pytest.raises(BlockIOError) as info:
            disk.pwrite(b"\x01" * 512, 0)
        assert info.value.errno == errno.EROFS
        assert disk.pread(512, 0) == bytes(512)


# -- cache mode -----------------------------------------------------------------------------


def test_cache_mode_is_read_and_set_like_cache_type(sock_dir: Path) -> None:
    with serve(sock_dir, "--memory", "4M") as sp, Disk.connect(str(sp.socket_path)) as disk:
        assert disk.cache_mode == "write back"
        disk.cache_mode = "write through"
        assert disk.cache_mode == "write through"
        config = ctl(sock_dir, "get-config")["config"]
        assert isinstance(config, dict) and config["writeback"] == 0
        assert ctl(sock_dir, "stats")["cache_mode"] == "write through"
        with pytest.raises(ValueError, match="cache mode"):
            disk.cache_mode = "unsafe"
        # From the host side: the driver re-reads the config on the change message.
        ctl(sock_dir, "set-cache-mode", mode="write back")
        assert eventually(lambda: disk.cache_mode == "write back", 10.0)


def test_serve_writethrough_starts_write_through(sock_dir: Path) -> None:
    with serve(sock_dir, "--memory", "4M", "--writethrough") as sp, \
            Disk.connect(str(sp.socket_path)) as disk:
        assert disk.cache_mode == "write through"
        assert "write through" in sp.output


@pytest.mark.interop
def test_qsd_cache_mode(qsd_factory: Callable[..., QemuStorageDaemon], tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    qsd = qsd_factory(image=image)
    with Disk.connect(str(qsd.socket_path)) as disk:
        assert disk.cache_mode == "write through"  # qsd 7.2 starts with wce 0
        disk.cache_mode = "write back"
        assert disk.cache_mode == "write back" and disk.device.config.writeback == 1
        disk.pwrite(b"\x07" * 4096, 0)
        disk.flush()
    with Disk.connect(str(qsd.socket_path)) as disk:
        assert disk.pread(4096, 0) == b"\x07" * 4096


_OPEN = re.compile(r'openat\(AT_FDCWD, "(?P<path>[^"]+)", (?P<flags>[A-Z_|]+).*\) = (?P<fd>\d+)')
_PWRITEV = re.compile(r"pwritev2?\((?P<fd>\d+), \[.*\], \d+, (?P<offset>\d+)")
_IO_SUBMIT = re.compile(r"io_submit\(.*IOCB_CMD_PWRITE.*aio_offset=(?P<offset>\d+)")
_FDATASYNC = re.compile(r"f(?:data)?sync\((?P<fd>\d+)")


def _traced_writes(sock_dir: Path, tmp_path: Path, *args: str) -> tuple[Path, list[str]]:
    """Serve an image under strace, write back at 1 MiB, flush, switch to write through,
    write at 2 MiB; the image and what strace saw."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    trace = tmp_path / "trace"
    sp = serve(sock_dir, "--file", str(image), *args)
    sp.argv = ["strace", "-f", "-qq", "-o", str(trace), "-e",
               "trace=openat,pwritev,pwritev2,io_submit,fdatasync,fsync", *sp.argv]
    with sp, Disk.connect(str(sp.socket_path)) as disk:
        disk.pwrite(b"B" * 4096, 1 * MiB)
        disk.flush()
        disk.cache_mode = "write through"
        disk.pwrite(b"T" * 4096, 2 * MiB)
    return image, trace.read_text().splitlines()


def test_file_backend_durability_follows_the_cache_mode(sock_dir: Path, tmp_path: Path) -> None:
    """Seen from the system calls, with threads (``--aio threads``): write back writes on
    the plain descriptor and FLUSH is an fdatasync; write through writes on the O_DSYNC
    descriptor.  Queues in threads of the server (``--workers thread``), so the descriptors
    it opened are the ones it writes on."""
    image, lines = _traced_writes(sock_dir, tmp_path, "--aio", "threads", "--workers",
                                  "thread")
    opened = {m["fd"]: m["flags"] for line in lines
              if (m := _OPEN.search(line)) and m["path"] == str(image)}
    plain = {fd for fd, flags in opened.items() if "O_DSYNC" not in flags}
    dsync = {fd for fd, flags in opened.items() if "O_DSYNC" in flags}
    assert plain and dsync, opened
    writes = [(i, m["fd"], int(m["offset"])) for i, line in enumerate(lines)
              if (m := _PWRITEV.search(line))]
    by_offset = {offset: (i, fd) for i, fd, offset in writes}
    back_at, back_fd = by_offset[1 * MiB]
    through_at, through_fd = by_offset[2 * MiB]
    assert back_fd in plain and through_fd in dsync, (writes, opened)
    assert not any("io_submit" in line for line in lines), "--aio threads used Linux AIO"
    syncs = [i for i, line in enumerate(lines)
             if (m := _FDATASYNC.search(line)) and m["fd"] in plain]
    assert any(back_at < i < through_at for i in syncs), "FLUSH did not fdatasync the image"


def test_native_aio_durability_follows_the_cache_mode(sock_dir: Path, tmp_path: Path) -> None:
    """With Linux AIO (the default where the file takes O_DIRECT): both writes go through
    io_submit on the O_DIRECT descriptor, the write-through one with RWF_DSYNC, and FLUSH
    is an fdatasync in between."""
    image, lines = _traced_writes(sock_dir, tmp_path)
    assert any(m["path"] == str(image) and "O_DIRECT" in m["flags"]
               for line in lines if (m := _OPEN.search(line)))
    submits = {int(m["offset"]): (i, line) for i, line in enumerate(lines)
               if (m := _IO_SUBMIT.search(line))}
    back_at, back = submits[1 * MiB]
    through_at, through = submits[2 * MiB]
    assert "RWF_DSYNC" not in back and "aio_rw_flags=RWF_DSYNC" in through
    syncs = [i for i, line in enumerate(lines) if _FDATASYNC.search(line)]
    assert any(back_at < i < through_at for i in syncs), "FLUSH did not fdatasync the image"
    data = image.read_bytes()
    assert data[1 * MiB : 1 * MiB + 4096] == b"B" * 4096
    assert data[2 * MiB : 2 * MiB + 4096] == b"T" * 4096


# -- topology and geometry -----------------------------------------------------------------


TOPOLOGY_ARGS = ("--physical-block-size", "4k", "--alignment-offset", "1k",
                 "--min-io-size", "8k", "--opt-io-size", "1M", "--geometry", "1000/16/63",
                 "--max-discard-sectors", "2048", "--max-discard-seg", "4")


def test_topology_and_geometry_reach_disk_and_info(sock_dir: Path) -> None:
    with serve(sock_dir, "--memory", "64M", *TOPOLOGY_ARGS) as sp:
        with Disk.connect(str(sp.socket_path)) as disk:
            assert disk.topology == Topology(4096, 1024, 8192, 1 << 20)
            assert disk.geometry == Geometry(1000, 16, 63)
            assert (disk.limits.max_discard_sectors, disk.limits.max_discard_seg) == (2048, 4)
        info = run_virtblk("info", str(sp.socket_path), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["topology"] == {"physical_block_size": 4096, "alignment_offset": 1024,
                                "min_io_size": 8192, "opt_io_size": 1 << 20}
    assert data["geometry"] == {"cylinders": 1000, "heads": 16, "sectors": 63}
    assert "BLK_GEOMETRY" in data["features_negotiated"]


def test_geometry_falls_back_to_64_heads_32_sectors(sock_dir: Path) -> None:
    with serve(sock_dir, "--memory", "64M", "--blk-size", "4096") as sp, \
            Disk.connect(str(sp.socket_path)) as disk:
        assert "BLK_GEOMETRY" not in disk.features
        assert disk.geometry == Geometry((64 * MiB // 512) >> 11, 64, 32)
        # No topology given: Linux still reports the logical block as the minimum I/O.
        assert disk.topology == Topology(4096, 0, 4096, 0)


@pytest.mark.interop
def test_qsd_topology(qsd_factory: Callable[..., QemuStorageDaemon], tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    qsd = qsd_factory(image=image, logical_block_size=4096)
    with Disk.connect(str(qsd.socket_path)) as disk:
        # qsd 7.2: TOPOLOGY with min_io = opt_io = 1 block, no geometry.
        assert disk.topology == Topology(4096, 0, 4096, 4096)
        assert disk.geometry == Geometry(8 * MiB // 512 >> 11, 64, 32)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--physical-block-size", "3000"], "power-of-two multiple"),
        (["--physical-block-size", "256"], "power-of-two multiple"),
        (["--alignment-offset", "100"], "not a multiple"),
        (["--min-io-size", "64M"], "min-io-size"),
        (["--geometry", "10x2x3"], "C/H/S"),
        (["--geometry", "70000/16/63"], "cylinders"),
        (["--geometry", "10/0/63"], "heads"),
        (["--lifetime", "1,2"], "PRE_EOL,A,B"),
    ],
)
def test_serve_refuses_bad_topology_options(sock_dir: Path, args: list[str], error: str) -> None:
    result = run_virtblk("serve", "--socket", str(sock_dir / "x.sock"), "--memory", "4M",
                         *args, timeout=60)
    assert result.returncode == 2 and error in result.stderr, result.stderr
    assert not (sock_dir / "x.sock").exists()


def test_serve_lifetime_option(sock_dir: Path) -> None:
    with serve(sock_dir, "--memory", "4M", "--lifetime", "2,3,4") as sp, \
            Disk.connect(str(sp.socket_path)) as disk:
        life = disk.lifetime
        assert (life.pre_eol_info, life.device_lifetime_est_typ_a,
                life.device_lifetime_est_typ_b) == (2, 3, 4)


# -- a Linux guest: read-only and geometry (one boot, two disks) ---------------------------

GUEST_SCRIPT = r"""
for d in vda vdb; do
    echo ${d}_RO=$(cat /sys/block/$d/ro)
    echo ${d}_CACHE=$(cat /sys/block/$d/cache_type)
    echo ${d}_GEO=$(fdisk -l /dev/$d | grep -o '[0-9]* heads, [0-9]* sectors/track')
done
echo vda_MD5=$(md5sum < /dev/vda | cut -d' ' -f1)
echo vda_WRITE=$(dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1 | head -1)
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; echo vdb_WRITE=$?
"""


@pytest.fixture
def two_devices(sock_dir: Path, tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess,
                                                                     Path]]:
    image = tmp_path / "ro.img"
    image.write_bytes(os.urandom(MiB) * 4)
    ro = ServeProcess(sock_dir / "ro.sock",
                      ["--file", str(image), "--read-only", "--geometry", "1000/16/63"])
    rw = ServeProcess(sock_dir / "rw.sock", ["--memory", "64M", "--writethrough"])
    with ro, rw:
        yield ro, rw, image


@pytest.mark.guest
def test_linux_guest_sees_read_only_geometry_and_initial_cache_mode(
    two_devices: tuple[ServeProcess, ServeProcess, Path], guest_kernel: GuestKernel
) -> None:
    ro, rw, image = two_devices
    result = run_guest(GUEST_SCRIPT, disks=[str(ro.socket_path), str(rw.socket_path)],
                       kernel=guest_kernel, timeout=180)
    values = dict(re.findall(r"^(vd[ab]_[A-Z0-9]+)=(.*)$", result.output, re.MULTILINE))
    context = f"{result.output}\n--- ro ---\n{ro.output}\n--- rw ---\n{rw.output}"
    assert (values["vda_RO"], values["vdb_RO"]) == ("1", "0"), context
    # The RO disk: Linux refuses the write itself (EPERM), the device never sees it.
    assert "Operation not permitted" in values["vda_WRITE"], context
    assert values["vda_MD5"] == hashlib.md5(image.read_bytes()).hexdigest(), context
    assert values["vdb_WRITE"] == "0", context
    # Geometry: ours for vda; virtblk_getgeo's fallback (64 heads, 32 sectors) for vdb.
    assert values["vda_GEO"] == "16 heads, 63 sectors/track", context
    assert values["vdb_GEO"] == "64 heads, 32 sectors/track", context
    # Cache: CONFIG_WCE's initial value, as served.
    assert (values["vda_CACHE"], values["vdb_CACHE"]) == ("write back", "write through")
