"""The seed's comparison of its bio path against its request path, with our driver.

The seed ("virtio-blk: Add bio-based IO path for virtio-blk") ran fio at 4 KiB, sequential
and random, read and write, through each path and compared IOPS, mean completion latency
and CPU.  Here the same four loads run at depth 32 through ``virtblk bench``'s engine,
once with ``path="bio"`` (each I/O is one virtio request) and once with
``path="request"`` (I/Os go through the block layer's plug, which merges adjacent ones),
against two null devices in their own processes: our embedded device and
qemu-storage-daemon (started here).  ``req/bio`` is the number of virtio requests the
device saw per I/O: 1 on the bio path, below 1 where merging happened.

    python benchmarks/bio_vs_request.py [--runtime 3] [--depth 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from daemons import SIZE, qemu_storage_daemon  # benchmarks/daemons.py

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, IoPath, RwMode, run_bench
from virtblk.util import process_cpu_seconds

LOADS: tuple[RwMode, ...] = ("read", "write", "randread", "randwrite")
PATHS: tuple[IoPath, ...] = ("bio", "request")


def run_device(
    device: str, disk: Disk, device_cpu: Callable[[], float], runtime: float, depth: int
) -> list[dict[str, object]]:
    """Every load through both paths on one disk; one row per (load, path)."""
    q = disk.device.queues[0]
    rows: list[dict[str, object]] = []
    for rw in LOADS:
        for path in PATHS:
            before = q.stats_submitted
            res = run_bench(disk, BenchConfig(rw=rw, bs=4096, iodepth=depth, runtime=runtime,
                                              path=path), device_cpu=device_cpu)
            s = res.summary()
            rows.append({
                "device": device,
                "rw": rw,
                "path": path,
                "iops": round(res.iops),
                "clat_mean_us": round(int(s["lat_mean_ns"]) / 1000, 1),  # type: ignore[call-overload]
                "driver_cpu_us_per_io": round(res.driver_cpu_per_io_us, 2),
                "device_cpu_us_per_io": (None if res.device_cpu_per_io_us is None
                                         else round(res.device_cpu_per_io_us, 2)),
                "requests_per_bio": round((q.stats_submitted - before) / max(1, res.ios), 4),
                "errors": res.errors,
            })
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    """The rows, then the seed's "short version": the bio path's gain over the request
    path per load (positive: the bio path is better)."""
    head = ("device", "rw", "path", "IOPS", "clat us", "drv CPU us/IO", "dev CPU us/IO",
            "req/bio")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['device']} | {r['rw']} | {r['path']} | {r['iops']} | {r['clat_mean_us']} "
              f"| {r['driver_cpu_us_per_io']} | {r['device_cpu_us_per_io']} "
              f"| {r['requests_per_bio']} |")
    print()
    print("| device | rw | bio IOPS gain | bio latency gain | bio driver CPU/IO saving |")
    print("|---|---|---|---|---|")
    by = {(r["device"], r["rw"], r["path"]): r for r in rows}
    for device in dict.fromkeys(r["device"] for r in rows):
        for rw in LOADS:
            b, q = by[(device, rw, "bio")], by[(device, rw, "request")]

            def gain(key: str, higher_better: bool, b: dict[str, object] = b,
                     q: dict[str, object] = q) -> str:
                bv, qv = float(b[key]), float(q[key])  # type: ignore[arg-type]
                if not qv:
                    return "-"
                pct = (bv / qv - 1) * 100 if higher_better else (1 - bv / qv) * 100
                return f"{pct:+.0f}%"

            print(f"| {device} | {rw} | {gain('iops', True)} | {gain('clat_mean_us', False)} "
                  f"| {gain('driver_cpu_us_per_io', False)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per row")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    with Disk.embedded(SIZE, backend="null", mode="process", packed=False) as disk:
        dev = disk.embedded_device
        assert dev is not None
        rows += run_device("virtblk (embedded null)", disk, dev.cpu_seconds, args.runtime,
                           args.depth)
    with tempfile.TemporaryDirectory(prefix="vb") as tmp, \
            qemu_storage_daemon(Path(tmp)) as (sock, pid), Disk.connect(sock, packed=False) as disk:
        rows += run_device("qemu-storage-daemon (null-co)", disk,
                           lambda: process_cpu_seconds(pid), args.runtime, args.depth)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
