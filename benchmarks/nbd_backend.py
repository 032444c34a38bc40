"""Our device over an NBD export against qemu-storage-daemon's NBD client, one export.

``qemu-nbd`` serves one raw file (written all through first, in the page cache, so the
server is quick and the NBD clients are what is measured) on a Unix socket, to two
clients at once (``--shared=2``):

* ``virtblk serve --nbd`` (one connection, the queue on a thread);
* qemu-storage-daemon with ``--blockdev driver=nbd,server.type=unix,...`` exporting it
  as a vhost-user-blk device.

Both are driven by our driver (``virtblk bench``'s engine, ``ioengine=queue``, write-back),
4 KiB random reads at depth 1 and 32 (``--workloads``); each workload runs ``--repeat``
times, the two devices one after the other, the order rotated, and the ratios (ours over
qsd) are computed per repetition and their median reported.  CPU per I/O: the device's
process and qemu-nbd's, from /proc.

    python benchmarks/nbd_backend.py [--runtime 5] [--repeat 3] [--size 256M]
        [--workloads randread:1,randread:32] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemons import cpu_model, serving  # benchmarks/daemons.py

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import parse_size, process_cpu_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peers.nbd import QemuNbd

PEERS = ("virtblk", "qsd")
LABELS = {"virtblk": "`virtblk serve --nbd`", "qsd": "qemu-storage-daemon `driver=nbd`"}


@contextlib.contextmanager
def ours(tmp: Path, uri: str) -> Iterator[tuple[str, int]]:
    """``virtblk serve --nbd`` on the export, one queue; yields (socket, pid)."""
    sock = tmp / "virtblk.sock"
    argv = [sys.executable, "-m", "virtblk", "serve", "--socket", str(sock), "--nbd", uri]
    with serving(argv, sock, "virtblk serve") as running:
        yield running


@contextlib.contextmanager
def qsd(tmp: Path, nbd_socket: Path, export: str) -> Iterator[tuple[str, int]]:
    """qemu-storage-daemon exporting the NBD export through its nbd driver, one queue."""
    sock = tmp / "qsd.sock"
    argv = ["qemu-storage-daemon", "--blockdev",
            f"driver=nbd,node-name=n0,server.type=unix,server.path={nbd_socket},"
            f"export={export}",
            "--export", f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues=1"]  # fmt: skip
    with serving(argv, sock, "qemu-storage-daemon") as running:
        yield running


def bench(sock: str, pids: tuple[int, int], rw: str, depth: int,
          runtime: float) -> dict[str, Any]:
    """One ``virtblk bench`` run on the device at ``sock`` (pids: the device's, the NBD
    server's)."""
    cfg = BenchConfig(rw=rw, bs=4096, iodepth=depth, runtime=runtime,  # type: ignore[arg-type]
                      ioengine="queue")  # fmt: skip
    device, server = pids
    before = process_cpu_seconds(server)
    with Disk.connect(sock, num_queues=1, packed=False) as disk:
        disk.cache_mode = "write back"
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(device))
    row: dict[str, Any] = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors against {sock}")
    return {
        "iops": row["iops"],
        "lat_mean_us": row["lat_mean_ns"] / 1000,
        "device_cpu_us_per_io": row["device_cpu_us_per_io"],
        "server_cpu_us_per_io": (process_cpu_seconds(server) - before) / row["ios"] * 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--workloads", default="randread:1,randread:32")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    workloads = [(rw, int(d)) for rw, d in (w.split(":") for w in args.workloads.split(","))]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vb-nbdb-", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        image = tmp / "disk.raw"
        with image.open("wb") as f:
            for _ in range(parse_size(args.size) >> 20):
                f.write(os.urandom(1 << 20))
        with QemuNbd(image, tmp / "nbd.sock", export="disk", shared=2) as server, \
                ours(tmp, server.uri) as (v_sock, v_pid), \
                qsd(tmp, tmp / "nbd.sock", "disk") as (q_sock, q_pid):  # fmt: skip
            assert server.process is not None
            nbd_pid = server.process.pid
            socks = {"virtblk": (v_sock, (v_pid, nbd_pid)), "qsd": (q_sock, (q_pid, nbd_pid))}
            for peer in PEERS:  # warm-up, not recorded
                bench(socks[peer][0], socks[peer][1], "randread", 32, 1.0)
            for rw, depth in workloads:
                for rep in range(args.repeat):
                    for peer in PEERS[rep % 2:] + PEERS[:rep % 2]:
                        row = bench(*socks[peer], rw, depth, args.runtime)
                        row.update(peer=peer, rw=rw, iodepth=depth, repeat=rep)
                        rows.append(row)
                        print(f"  {rw} d{depth} #{rep} {peer:>7}: {row['iops']:>8,.0f} IOPS "
                              f"lat {row['lat_mean_us']:6.0f} us, CPU/IO device "
                              f"{row['device_cpu_us_per_io']:.1f} qemu-nbd "
                              f"{row['server_cpu_us_per_io']:.1f} us", flush=True)
    summary: dict[str, Any] = {}
    lines = ["| workload | device | IOPS | mean latency (us) | device CPU/IO (us) "
             "| qemu-nbd CPU/IO (us) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    ratio_lines = ["| workload | IOPS, ours / qsd | device CPU/IO, ours / qsd |",
                   "| --- | --- | --- |"]
    for rw, depth in workloads:
        runs = {p: sorted((r for r in rows if (r["peer"], r["rw"], r["iodepth"]) ==
                           (p, rw, depth)), key=lambda r: r["repeat"]) for p in PEERS}
        med = {p: {k: statistics.median(r[k] for r in runs[p])
                   for k in ("iops", "lat_mean_us", "device_cpu_us_per_io",
                             "server_cpu_us_per_io")} for p in PEERS}
        iops = [v["iops"] / q["iops"] for v, q in zip(runs["virtblk"], runs["qsd"], strict=True)]
        cpu = [v["device_cpu_us_per_io"] / q["device_cpu_us_per_io"]
               for v, q in zip(runs["virtblk"], runs["qsd"], strict=True)]
        summary[f"{rw}_d{depth}"] = {"medians": med, "iops_over_qsd": iops,
                                     "device_cpu_over_qsd": cpu}
        for p in PEERS:
            m = med[p]
            lines.append(f"| {rw}, depth {depth} | {LABELS[p]} | {m['iops']:,.0f} | "
                         f"{m['lat_mean_us']:,.0f} | {m['device_cpu_us_per_io']:.1f} | "
                         f"{m['server_cpu_us_per_io']:.1f} |")
        ratio_lines.append(
            f"| {rw}, depth {depth} | **{statistics.median(iops):.2f}** "
            f"[{', '.join(f'{x:.2f}' for x in iops)}] | {statistics.median(cpu):.2f} "
            f"[{', '.join(f'{x:.2f}' for x in cpu)}] |")
    table = "\n".join([*lines, "", *ratio_lines, "",
                       f"Medians of {args.repeat} runs of {args.runtime:g} s; ratios: the "
                       "median of the per-run ratios [runs]."])
    print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "args": vars(args), "rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
