"""``virtblk bench`` against fio on one image file: where the gap is, and why.

fio's engines cannot speak vhost-user, so the common ground is a file: fio reads and writes
the image directly (libaio and psync, ``direct=1``, plus psync buffered, which is what our
FileBackend does per request), while our driver reaches the same image through a
vhost-user-blk device: ours (``virtblk`` file backend, buffered ``preadv``/``pwritev`` in a
worker thread per queue) and qemu-storage-daemon's (``aio=native``, ``cache.direct=on``).
The qemu-storage-daemon column separates what our driver costs from what our device costs.

Both devices run with their write cache on (``direct=1`` without fsync asks for no
more).  The image is filled with data first (holes read as zeros without touching the disk) and
evicted from the page cache before each configuration.  Every
configuration runs back to back in one run; ratios are against fio libaio ``direct=1`` at
the same depth.  ``--json FILE`` writes the record.

    python benchmarks/fio_compare.py [--runtime 3] [--size 256M] [--dir /var/tmp]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemons import qsd_file  # benchmarks/daemons.py

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import parse_size, process_cpu_seconds

WORKLOADS = (("randread", 1), ("randread", 32), ("randwrite", 32))


def fill(image: Path, size: int) -> None:
    """Write real data over the whole image (and get it to the disk)."""
    chunk = os.urandom(1 << 20)
    with open(image, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def drop_cache(image: Path) -> None:
    """Evict the image from the page cache, so that every configuration starts cold (our
    FileBackend reads through the cache; fio direct=1 and the daemon do not)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_fio(image: Path, rw: str, depth: int, engine: str, direct: bool,
            runtime: float) -> dict[str, Any]:  # fmt: skip
    """fio on the image; the figures we compare, from its JSON."""
    out = subprocess.run(
        ["fio", "--name=cmp", f"--filename={image}", f"--rw={rw}", "--bs=4k",
         f"--ioengine={engine}", f"--iodepth={depth}", f"--direct={int(direct)}",
         f"--runtime={runtime}", "--time_based", "--randrepeat=0", "--norandommap",
         "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=runtime + 60,
    ).stdout  # fmt: skip
    job = json.loads(out)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    ios = side["total_ios"]
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    pct = side["clat_ns"]["percentile"]
    return {
        "iops": side["iops"],
        "p50_us": pct["50.000000"] / 1000,
        "p99_us": pct["99.000000"] / 1000,
        "driver_us_per_io": cpu_s / ios * 1e6 if ios else 0.0,
        "device_us_per_io": None,
    }


def run_ours(disk: Disk, rw: str, depth: int, runtime: float,
             device_cpu: Any) -> dict[str, Any]:  # fmt: skip
    """Our driver (bench engine, ioengine queue) on an already-connected disk, with the
    device's write cache on: fio's ``direct=1`` without fsync asks for no more durability,
    and qemu-storage-daemon flushes after every write in write-through mode."""
    disk.cache_mode = "write back"
    cfg = BenchConfig(rw=rw, bs=4096, iodepth=depth, runtime=runtime)  # type: ignore[arg-type]
    r = run_bench(disk, cfg, device_cpu=device_cpu)
    pct = r.percentiles()
    return {
        "iops": r.iops,
        "p50_us": pct[50.0] / 1000,
        "p99_us": pct[99.0] / 1000,
        "driver_us_per_io": r.driver_cpu_per_io_us,
        "device_us_per_io": r.device_cpu_per_io_us,
    }


def main() -> int:
    """Run every configuration and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--dir", default="/var/tmp", help="where the image goes (not tmpfs)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    size = parse_size(args.size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmpdir:
        tmp = Path(tmpdir)
        image = tmp / "image.raw"
        fill(image, size)
        drop_cache(image)
        for rw, depth in WORKLOADS:
            def add(name: str, figures: dict[str, Any], rw: str = rw, depth: int = depth) -> None:
                drop_cache(image)  # for the next configuration
                rows.append({"config": name, "rw": rw, "iodepth": depth, **figures})
                print(f"  {rw} depth {depth}: {name}: {figures['iops']:,.0f} IOPS",
                      file=sys.stderr, flush=True)  # fmt: skip

            add("fio libaio direct=1", run_fio(image, rw, depth, "libaio", True, args.runtime))
            if depth == 1:
                add("fio psync direct=1", run_fio(image, rw, 1, "psync", True, args.runtime))
                add("fio psync buffered", run_fio(image, rw, 1, "psync", False, args.runtime))
            with Disk.embedded(size=size, backend="file", path=str(image), packed=False) as disk:
                assert disk.embedded_device is not None
                add("virtblk bench, our device",
                    run_ours(disk, rw, depth, args.runtime, disk.embedded_device.cpu_seconds))
            with qsd_file(image, tmp) as (sock, pid), \
                    Disk.connect(sock, num_queues=1, packed=False) as disk:
                add("virtblk bench, qemu-storage-daemon",
                    run_ours(disk, rw, depth, args.runtime, lambda: process_cpu_seconds(pid)))

    print(f"{'workload':<16} {'configuration':<36} {'IOPS':>9} {'p50 us':>8} {'p99 us':>8} "
          f"{'drv us/IO':>9} {'dev us/IO':>9} {'vs fio':>7}")  # fmt: skip
    for r in rows:
        ref = next(x for x in rows if x["rw"] == r["rw"] and x["iodepth"] == r["iodepth"]
                   and x["config"] == "fio libaio direct=1")  # fmt: skip
        r["iops_over_fio_libaio"] = round(r["iops"] / ref["iops"], 3)
        dev = r["device_us_per_io"]
        print(
            f"{r['rw'] + ' qd' + str(r['iodepth']):<16} {r['config']:<36} {r['iops']:>9,.0f} "
            f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['driver_us_per_io']:>9.2f} "
            f"{'-' if dev is None else f'{dev:.2f}':>9} {r['iops_over_fio_libaio']:>6.2f}x"
        )
    record = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "size": size,
              "runtime_s": args.runtime, "runs": rows}  # fmt: skip
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
