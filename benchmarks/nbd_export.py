"""What ``virtblk nbd`` costs: NBD clients through the export against the same workload
through ``virtblk bench`` directly on the same device.

Two devices of 1 GiB whose data lives in RAM, so that a write moves its bytes as it would
on real storage (a null device would make the direct writes free): ``virtblk serve
--memory`` and qemu-storage-daemon exporting a raw file in /dev/shm (tmpfs).  On each,
``--repeat`` times, one after the other (a vhost-user device serves one frontend at a
time):

* direct: ``virtblk bench``'s engine on the device (``ioengine=queue``): 4 KiB random
  reads at depth 1 and 32, and sequential 2 MiB writes at depth 8 (MiB/s);
* through the export (``virtblk nbd`` on a Unix socket, one process): fio's ``nbd``
  engine, 4 KiB random reads at depth 1 and 32; ``qemu-img convert -n -W -m 8`` of a
  ``--convert-size`` random raw file (cached) into the export (MiB/s: its size over the
  wall time, start-up included).

Ratios (export over direct) are taken per repetition and their median reported.

    python benchmarks/nbd_export.py [--runtime 5] [--repeat 3] [--convert-size 256M]
        [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from daemons import SIZE, cpu_model, serving

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import parse_size


def ours(tmp: Path) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """``virtblk serve --memory``."""
    sock = tmp / "virtblk.sock"
    return serving([sys.executable, "-m", "virtblk", "serve", "--socket", str(sock),
                    "--memory", str(SIZE)], sock, "virtblk serve")


@contextlib.contextmanager
def qsd_tmpfs(tmp: Path) -> Iterator[tuple[str, int]]:
    """qemu-storage-daemon exporting a raw file in /dev/shm."""
    sock = tmp / "qsd.sock"
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="nbd-bench-") as image:
        image.truncate(SIZE)
        argv = ["qemu-storage-daemon", "--blockdev",
                f"driver=file,node-name=f,filename={image.name}",
                "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                f"addr.path={sock},writable=on"]
        with serving(argv, sock, "qemu-storage-daemon") as running:
            yield running


DEVICES: dict[str, Callable[[Path], contextlib.AbstractContextManager[tuple[str, int]]]] = {
    "virtblk": ours,
    "qsd": qsd_tmpfs,
}
LABELS = {"virtblk": "`virtblk serve --memory`", "qsd": "qemu-storage-daemon, file on tmpfs"}
WORKLOADS = ("randread 4k depth 1", "randread 4k depth 32", "convert / write 2M depth 8")


@contextlib.contextmanager
def nbd_export(tmp: Path, vhost_sock: str) -> Iterator[str]:
    """``virtblk nbd`` on ``vhost_sock``; yields the export's URI."""
    sock = tmp / "nbd.sock"
    argv = [sys.executable, "-m", "virtblk", "nbd", vhost_sock, "--listen", f"unix:{sock}"]
    with serving(argv, sock, "virtblk nbd"):
        yield f"nbd+unix:///?socket={sock}"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()


def direct(sock: str, cfg: BenchConfig) -> float:
    """IOPS (reads) or MiB/s (writes) of ``cfg`` through our driver on the device."""
    with Disk.connect(sock, num_queues=1) as disk:
        result = run_bench(disk, cfg)
    row = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors against {sock}")
    if cfg.writes:
        return float(row["bw_bytes_per_s"]) / (1 << 20)  # type: ignore[arg-type]
    return float(row["iops"])  # type: ignore[arg-type]


def fio_nbd(uri: str, depth: int, runtime: float) -> float:
    """IOPS of fio's nbd engine, 4 KiB random reads at ``depth``."""
    out = subprocess.run(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
         f"--iodepth={depth}", f"--runtime={runtime}", "--time_based", "--size=1G",
         "--output-format=json"],
        capture_output=True, text=True, timeout=runtime + 120, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio: error {job['error']}")
    return float(job["read"]["iops"])


def convert(source: Path, uri: str) -> float:
    """MiB/s of ``qemu-img convert`` of ``source`` into the export."""
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw",
                    str(source), uri], check=True, timeout=600)
    return source.stat().st_size / (1 << 20) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--convert-size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--markdown", dest="markdown_path")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmpdir:
        tmp = Path(tmpdir)
        source = tmp / "source.raw"
        with source.open("wb") as f:
            for _ in range(args.convert_size >> 20):
                f.write(os.urandom(1 << 20))
        for name, start in DEVICES.items():
            with start(tmp) as (sock, _pid):
                for rep in range(args.repeat):
                    reads = {d: direct(sock, BenchConfig(rw="randread", bs=4096, iodepth=d,
                                                         runtime=args.runtime))
                             for d in (1, 32)}
                    writes = direct(sock, BenchConfig(rw="write", bs=2 << 20, iodepth=8,
                                                      runtime=args.runtime))
                    with nbd_export(tmp, sock) as uri:
                        exported = {d: fio_nbd(uri, d, args.runtime) for d in (1, 32)}
                        copied = convert(source, uri)
                    for workload, ours, theirs in (
                            (WORKLOADS[0], exported[1], reads[1]),
                            (WORKLOADS[1], exported[32], reads[32]),
                            (WORKLOADS[2], copied, writes)):
                        rows.append({"device": name, "repeat": rep, "workload": workload,
                                     "export": round(ours, 1), "direct": round(theirs, 1),
                                     "ratio": round(ours / theirs, 3)})
                        print(f"  {name} #{rep} {workload}: export {ours:,.0f} direct "
                              f"{theirs:,.0f} ({ours / theirs:.2f})", flush=True)
    table = []
    for name in DEVICES:
        for workload in WORKLOADS:
            mine = [r for r in rows if r["device"] == name and r["workload"] == workload]
            table.append({"device": name, "workload": workload,
                          "export": statistics.median(r["export"] for r in mine),
                          "direct": statistics.median(r["direct"] for r in mine),
                          "ratio": statistics.median(r["ratio"] for r in mine)})
    lines = ["| device | workload | through `virtblk nbd` | `virtblk bench` direct | ratio |",
             "| --- | --- | ---: | ---: | ---: |"]
    for t in table:
        unit = "MiB/s" if "convert" in t["workload"] else "IOPS"
        lines.append(f"| {LABELS[t['device']]} | {t['workload']} | {t['export']:,.0f} {unit} "
                     f"| {t['direct']:,.0f} {unit} | {t['ratio']:.2f} |")
    markdown = "\n".join(lines)
    print(markdown)
    record = {
        "benchmark": "nbd_export",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "args": {"runtime": args.runtime, "repeat": args.repeat,
                 "convert_size": args.convert_size},
        "table": table,
        "rows": rows,
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2) + "\n")
    if args.markdown_path:
        Path(args.markdown_path).write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
