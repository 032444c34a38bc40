"""The queue API's three ways to wait, in one run: interrupt, adaptive polling, polling.

Our device serves a null backend from its own process; the driver keeps ``depth`` 4 KiB
random reads in flight through a :class:`~virtblk.driver.queue_api.QueueHandle`, resubmitting
each completion, sleeping on the call eventfd (interrupt mode), polling the used ring up to
128 us before sleeping (``poll_us=128``, adaptive), or busy-polling with notifications off
(poll mode).  We print IOPS and CPU per I/O (driver and device, from /proc, the device's
worker processes included) for each, and the ratios to interrupt mode, plus a JSON record
(``--json FILE``).

    python benchmarks/queue_api.py [--runtime 3] [--depths 1,32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from virtblk import Disk
from virtblk.driver.queue_api import QueueHandle

BS = 4096
SIZE = 1 << 30


MODES = (("interrupt", False, 0.0), ("adaptive", False, 128.0), ("poll", True, 0.0))
"""(name, poll, poll_us): sleep on the interrupt; poll up to 128 us then sleep; spin."""


def run_one(
    disk: Disk, *, mode: str, poll: bool, poll_us: float, depth: int, runtime: float
) -> dict[str, Any]:
    """Keep ``depth`` reads in flight for ``runtime`` seconds; returns the measurements."""
    embedded = disk.embedded_device
    assert embedded is not None
    rng = random.Random(1)
    blocks = SIZE // BS
    bufs = [disk.buffer(BS) for _ in range(depth)]
    ios = 0
    with QueueHandle(disk, poll=poll, poll_us=poll_us) as q:
        for i, buf in enumerate(bufs):
            q.read(rng.randrange(blocks) * BS, buf, i)
        dev0, cpu0, t0 = embedded.cpu_seconds(), time.process_time(), time.monotonic()
        end = t0 + runtime
        while True:
            done = q.do_io(1)
            ios += len(done)
            if time.monotonic() >= end:
                break
            for c in done:
                if c.ret:
                    raise OSError(-c.ret, c.error_msg)
                q.read(rng.randrange(blocks) * BS, bufs[c.user_data], c.user_data)
        elapsed = time.monotonic() - t0
        driver_cpu = time.process_time() - cpu0
        device_cpu = embedded.cpu_seconds() - dev0
    for buf in bufs:
        disk.free_buffer(buf)
    return {
        "mode": mode,
        "depth": depth,
        "ios": ios,
        "iops": ios / elapsed,
        "driver_cpu_us_per_io": driver_cpu / ios * 1e6,
        "device_cpu_us_per_io": device_cpu / ios * 1e6,
        "driver_cpu_share": driver_cpu / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--depths", default="1,32", help="comma-separated queue depths")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    results: list[dict[str, Any]] = []
    with Disk.embedded(size=SIZE, backend="null", mode="process", packed=False) as disk:
        for depth in depths:
            for mode, poll, poll_us in MODES:
                results.append(run_one(disk, mode=mode, poll=poll, poll_us=poll_us,
                                       depth=depth, runtime=args.runtime))
    print(f"{'mode':<10} {'depth':>5} {'IOPS':>10} {'drv us/io':>10} {'dev us/io':>10} "
          f"{'drv CPU':>8}")
    for r in results:
        print(f"{r['mode']:<10} {r['depth']:>5} {r['iops']:>10.0f} "
              f"{r['driver_cpu_us_per_io']:>10.1f} {r['device_cpu_us_per_io']:>10.1f} "
              f"{r['driver_cpu_share']:>7.0%}")
    ratios = []
    for depth in depths:
        irq = next(r for r in results if r["depth"] == depth and r["mode"] == "interrupt")
        for other in (r for r in results if r["depth"] == depth and r["mode"] != "interrupt"):
            ratio = {
                "depth": depth,
                "mode": other["mode"],
                "iops": other["iops"] / irq["iops"],
                "driver_cpu_per_io": other["driver_cpu_us_per_io"] / irq["driver_cpu_us_per_io"],
                "device_cpu_per_io": other["device_cpu_us_per_io"] / irq["device_cpu_us_per_io"],
            }
            ratios.append(ratio)
            print(f"depth {depth}: {other['mode']}/interrupt IOPS x{ratio['iops']:.2f}, driver "
                  f"CPU per I/O x{ratio['driver_cpu_per_io']:.2f}, device CPU per I/O "
                  f"x{ratio['device_cpu_per_io']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
