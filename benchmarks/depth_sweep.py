"""IOPS and CPU per I/O against queue depth, our driver on two devices, in one run.

Our driver (``virtblk.tools.bench``, ioengine queue, 4 KiB random reads) drives
qemu-storage-daemon (null-co, read-zeroes) and our own device (``virtblk serve --null``),
both started once with two queues and kept running; each depth is measured on both devices
back to back, so the ratios compare figures taken under the same machine load.  Then 1 job
against 2 jobs (``numjobs=2``: two processes, one hardware queue each) at one depth.

CPU per I/O is read from /proc for the device process and from the jobs' own CPU times for
the driver.  Prints a table and the ratios; ``--json FILE`` writes the record.

    python benchmarks/depth_sweep.py [--runtime 3] [--depths 1,2,4,8,16,32,64,128]
                                     [--jobs-depth 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemons import qemu_storage_daemon, virtblk_serve  # benchmarks/daemons.py

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import process_cpu_seconds

DEVICES = ("qemu-storage-daemon", "virtblk")


def measure(sock: str, pid: int, depth: int, numjobs: int, runtime: float) -> dict[str, Any]:
    """One run of our driver against the device on ``sock``, on a fresh connection."""
    with Disk.connect(sock, num_queues=numjobs, queue_size=256, packed=False) as disk:
        cfg = BenchConfig(rw="randread", bs=4096, iodepth=depth, runtime=runtime,
                          numjobs=numjobs, ioengine="queue")  # fmt: skip
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid))
    pct = result.percentiles()
    row: dict[str, Any] = result.summary()
    row.update(
        p50_us=round(pct[50.0] / 1000, 1),
        p99_us=round(pct[99.0] / 1000, 1),
        driver_cpu_s=round(result.driver_cpu, 3),
        device_cpu_s=round(result.device_cpu or 0.0, 3),
    )
    return row


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def main() -> int:
    """Run the sweep and print it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--depths", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--jobs-depth", type=int, default=32)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        peers = {
            "qemu-storage-daemon": stack.enter_context(qemu_storage_daemon(tmp, num_queues=2)),
            "virtblk": stack.enter_context(virtblk_serve(tmp, num_queues=2)),
        }
        plan = [(d, 1) for d in depths]
        if args.jobs_depth not in depths:
            plan.append((args.jobs_depth, 1))
        plan.append((args.jobs_depth, 2))
        for depth, numjobs in plan:
            for name in DEVICES:
                sock, pid = peers[name]
                row = measure(sock, pid, depth, numjobs, args.runtime)
                row["device"] = name
                rows.append(row)
                print(f"  {name:<20} depth {depth:>3} jobs {numjobs}: {row['iops']:>10,.0f} IOPS",
                      file=sys.stderr, flush=True)  # fmt: skip

    head = (f"{'device':<20} {'depth':>5} {'jobs':>4} {'IOPS':>10} {'p50 us':>8} {'p99 us':>8} "
            f"{'driver us/IO':>12} {'device us/IO':>12}")  # fmt: skip
    print(head)
    for r in rows:
        print(
            f"{r['device']:<20} {r['iodepth']:>5} {r['numjobs']:>4} {r['iops']:>10,.0f} "
            f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['driver_cpu_us_per_io']:>12.2f} "
            f"{r['device_cpu_us_per_io']:>12.2f}"
        )
    ratios: list[dict[str, Any]] = []
    print("\nratios, our device over qemu-storage-daemon (same run, same driver):")
    for depth, numjobs in plan:
        q = next(r for r in rows if r["device"] == DEVICES[0] and r["iodepth"] == depth
                 and r["numjobs"] == numjobs)  # fmt: skip
        v = next(r for r in rows if r["device"] == DEVICES[1] and r["iodepth"] == depth
                 and r["numjobs"] == numjobs)  # fmt: skip
        ratio = {
            "iodepth": depth,
            "numjobs": numjobs,
            "iops": _ratio(v["iops"], q["iops"]),
            "device_cpu_per_io": _ratio(v["device_cpu_us_per_io"], q["device_cpu_us_per_io"]),
            "driver_cpu_per_io_over_qsd_device": _ratio(
                q["driver_cpu_us_per_io"], q["device_cpu_us_per_io"]
            ),
        }
        ratios.append(ratio)
        print(f"  depth {depth:>3} jobs {numjobs}: IOPS {ratio['iops']}x, device CPU/IO "
              f"{ratio['device_cpu_per_io']}x; our driver's CPU/IO is "
              f"{ratio['driver_cpu_per_io_over_qsd_device']}x the daemon's")  # fmt: skip
    scaling: dict[str, float] = {}
    print("\n2 jobs over 1 job at depth", args.jobs_depth, "(IOPS):")
    for name in DEVICES:
        one = next(r for r in rows if r["device"] == name and r["iodepth"] == args.jobs_depth
                   and r["numjobs"] == 1)  # fmt: skip
        two = next(r for r in rows if r["device"] == name and r["iodepth"] == args.jobs_depth
                   and r["numjobs"] == 2)  # fmt: skip
        scaling[name] = _ratio(two["iops"], one["iops"])
        print(f"  {name:<20} {scaling[name]}x")
    record = {
        "machine": os.uname().nodename,
        "cpus": os.cpu_count(),
        "runtime_s": args.runtime,
        "runs": rows,
        "ratios": ratios,
        "two_jobs_over_one": scaling,
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
