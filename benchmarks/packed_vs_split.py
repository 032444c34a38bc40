"""Split against packed rings in one run: our driver against ``virtblk serve --null``
(which offers both), 4 KiB random reads at depth 1 and 32, as ratios measured side by side.

For each depth every repetition runs the split ring and the packed ring on the same
device process (a fresh connection each, ``Disk.connect(packed=False/True)``), the order
rotated from one repetition to the next so neither ring always goes first; IOPS, the
driver's CPU per I/O (this process) and the device's (its process and queue workers, from
/proc) are recorded per run, and the ratios packed / split are computed per repetition
and their median reported.  ``--json FILE`` writes the whole record.

    python benchmarks/packed_vs_split.py [--runtime 3] [--repeat 3] [--workers process]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemons import SIZE, cpu_model  # benchmarks/daemons.py
from ratios import ours  # benchmarks/ratios.py: virtblk serve with a control socket

from virtblk import Disk
from virtblk.device.control import notification_counters
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import process_cpu_seconds

RINGS = ("split", "packed")
DEPTHS = (1, 32)
METRICS = ("iops", "driver_cpu_us_per_io", "device_cpu_us_per_io")


def measure(sock: str, pid: int, control: Path, cfg: BenchConfig, ring: str) -> dict[str, Any]:
    """One bench run of our driver on ``ring`` against the device on ``sock``."""
    with Disk.connect(sock, packed=ring == "packed") as disk:
        assert disk.ring == ring
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid),
                           device_counters=lambda: notification_counters(control))
    row: dict[str, Any] = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors on the {ring} ring")
    row["ring"] = ring
    return row


def main() -> int:
    """Run both rings at both depths; print and (``--json``) record the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", choices=("process", "thread"), default="process",
                    help="virtblk serve --workers")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, Any]] = {}
    table: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with ours(tmp, "--null", str(SIZE), "--workers", args.workers) as (sock, pid):
            control = tmp / "virtblk.ctl"
            for depth in DEPTHS:
                cfg = BenchConfig(rw="randread", bs=4096, iodepth=depth, runtime=args.runtime,
                                  ioengine="queue")
                runs: dict[str, list[dict[str, Any]]] = {ring: [] for ring in RINGS}
                for rep in range(args.repeat):
                    order = RINGS if rep % 2 == 0 else RINGS[::-1]
                    for ring in order:
                        row = measure(sock, pid, control, cfg, ring)
                        row.update(depth=depth, repeat=rep)
                        rows.append(row)
                        runs[ring].append(row)
                        print(f"  depth {depth} #{rep} {ring:>6}: IOPS {row['iops']:,.0f}; "
                              f"CPU/IO driver {row['driver_cpu_us_per_io']} us, device "
                              f"{row['device_cpu_us_per_io']} us", flush=True)
                table[depth] = {ring: {m: statistics.median(r[m] for r in runs[ring])
                                       for m in METRICS} for ring in RINGS}
                for metric in METRICS:
                    per_rep = [p[metric] / s[metric]
                               for s, p in zip(runs["split"], runs["packed"], strict=True)]
                    ratios[f"packed_over_split_{metric}_d{depth}"] = {
                        "median": round(statistics.median(per_rep), 3),
                        "runs": [round(v, 3) for v in per_rep]}
    print(f"\nmedian of {args.repeat} (4 KiB randread, virtblk serve --null, "
          f"--workers {args.workers}):")
    print(f"  {'depth':>5} {'ring':>6} {'IOPS':>9} {'driver us/IO':>13} {'device us/IO':>13}")
    for depth, by_ring in table.items():
        for ring, m in by_ring.items():
            print(f"  {depth:>5} {ring:>6} {m['iops']:>9,.0f} {m['driver_cpu_us_per_io']:>13.1f}"
                  f" {m['device_cpu_us_per_io']:>13.1f}")
    print("\nratios packed / split, median of the per-repetition ratios:")
    for key, value in ratios.items():
        print(f"  {key:<44} {value['median']:>7}   runs {value['runs']}")
    if args.json_path:
        record = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), "cpu": cpu_model(),
                        "kernel": platform.release(), "python": platform.python_version()},
            "args": vars(args),
            "medians": {str(d): v for d, v in table.items()},
            "ratios": ratios,
            "runs": rows,
        }
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
