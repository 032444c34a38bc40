"""The ``virtblk`` command as users run it: the installed script, in a child process.

Exit codes follow click: 0 success, 1 a runtime failure (``Error: ...``), 2 a usage
error (with the ``Usage:`` line and what was wrong).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from interop.serve_process import run_virtblk


def test_top_level_help() -> None:
    result = run_virtblk("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: virtblk" in result.stdout
    for command in ("serve", "info", "bench"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


def test_version() -> None:
    result = run_virtblk("--version")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d+\.\d+\.\d+", result.stdout)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("serve", ["--socket", "--file", "--memory", "--null", "--read-only", "--num-queues",
                   "--serial", "--blk-size", "--poll-us", "--workers", "--aio", "--io-threads",
                   "--no-packed"]),
        ("bench", ["--rw", "--bs", "--iodepth", "--runtime", "--output-format", "--backend",
                   "--iodepth_batch_complete_min", "--poll-us", "--device-poll-us",
                   "--device-control", "--keep-cb-while-draining"]),
        ("info", ["--json", "--timeout"]),
        ("check", ["--json", "--read-only", "--timeout", "--only"]),
        ("control", ["--timeout", "resize", "set-read-only", "stats", "get-config"]),
    ],
)  # fmt: skip
def test_subcommand_help(command: str, options: list[str]) -> None:
    result = run_virtblk(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: virtblk {command}" in result.stdout
    missing = [option for option in options if option not in result.stdout]
    assert missing == []


HEAVY_MODULES = (
    "numpy",
    "rich",
    "asyncio",
    "virtblk.driver",
    "virtblk.device",
    "virtblk.vhost_user",
    "virtblk.virtio",
    "virtblk.tools.bench",
    "virtblk.tools.check",
    "virtblk.tools.nbd",
    "virtblk.nbd",
)
"""What ``python -X importtime`` showed the command importing before it loaded subcommands
only when they run (0.7 s of the 1 s ``virtblk --help`` took)."""

_REPORT_MODULES = """
import json, sys
from virtblk.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["serve", "--help"], ["info", "--help"], ["bench", "--help"],
     ["check", "--help"], ["control", "--help"], ["control", "x", "resize", "--help"],
     ["nbd", "--help"]],
    ids=lambda args: " ".join(args),
)  # fmt: skip
def test_help_loads_no_subcommand(args: list[str]) -> None:
    """Help needs only click and the options: the modules a subcommand runs are imported
    when it runs (what the test measures is what was imported, not how long it took)."""
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_MODULES, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Usage: " in done.stdout
    modules = json.loads(done.stdout.rsplit("MODULES ", 1)[1])
    loaded = [heavy for heavy in HEAVY_MODULES
              if any(m == heavy or m.startswith(heavy + ".") for m in modules)]  # fmt: skip
    assert loaded == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--socket", "S", "--memory", "1M", "--null", "1M"],
         "give exactly one of --file, --memory, --null, --rbd"),
        (["serve", "--socket", "S"], "give exactly one of --file, --memory, --null, --rbd"),
        (["serve", "--socket", "S", "--memory", "1M", "--ceph-conf", "c"],
         "--ceph-conf goes with --rbd"),
        (["serve", "--socket", "S", "--memory", "1M", "--size", "2M"],
         "--size goes with --file or --rbd"),
        (["serve", "--socket", "S", "--rbd", "rbd/x", "--rbd-op-timeout", "0"],
         "--rbd-op-timeout"),
        (["serve", "--socket", "S", "--rbd", "justaname"], "POOL/IMAGE"),
        (["serve", "--memory", "1M"], "Missing option '--socket'"),
        (["serve", "--socket", "S", "--memory", "1M", "--serial", "x" * 21],
         "serial is 21 bytes; GET_ID answers at most 20"),
        (["serve", "--socket", "S", "--memory", "1M", "--num-queues", "0"],
         "num_queues must be in 1..65535, got 0"),
        (["serve", "--socket", "S", "--memory", "lots"], "--memory"),
        (["serve", "--socket", "S", "--memory", "8M", "--zoned", "--workers", "process"],
         "--zoned serves its queues from threads"),
        (["serve", "--socket", "S", "--null", "8M", "--poll-us", "-5"], "--poll-us"),
        (["serve", "--socket", "S", "--null", "8M", "--workers", "fibers"], "'fibers' is not"),
        (["bench", "--rw", "sideways"], "'sideways' is not one of"),
        (["bench", "--iodepth", "0"], "--iodepth"),
        (["bench", "--runtime", "0"], "--runtime"),
        (["bench", "--bs", "1000"], "must be a multiple of 512"),
        (["bench", "--queue-size", "100"], "not a power of two"),
        (["bench", "--backend", "file"], "--backend file needs --file"),
        (["bench", "--file", "x.img"], "--file goes with --backend file"),
        (["info"], "Missing argument 'SOCKET'"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)  # fmt: skip
def test_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_virtblk(*args, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Usage: virtblk" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_missing_image_without_size(tmp_path: Path) -> None:
    """A runtime failure (not a usage error): exit 1 with the reason, no traceback."""
    missing = tmp_path / "nothing.img"
    result = run_virtblk("serve", "--socket", str(tmp_path / "s"), "--file", str(missing))
    assert result.returncode == 1, result.stderr
    assert "Error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_bench_prints_iops_and_latency() -> None:
    result = run_virtblk("bench", "--runtime", "1", "--iodepth", "4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "iodepth=4" in out
    match = re.search(r"IOPS=([\d,]+)", out)
    assert match is not None, out
    assert int(match.group(1).replace(",", "")) > 0
    assert re.search(r"clat \(us\): mean=[\d.]+, p50=[\d.]+.*p99=[\d.]+", out), out
    assert "0 errors" in out


def test_bench_json() -> None:
    result = run_virtblk(
        "bench", "--runtime", "1", "--iodepth", "4", "--rw", "randwrite",
        "--backend", "memory", "--device-size", "16M", "--output-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # fio's layout (tests/cli/test_bench.py checks it all)
    job = data["jobs"][0]
    assert job["write"]["iops"] > 0
    assert job["write"]["total_ios"] > 0
    assert job["error"] == 0
    assert job["job options"]["rw"] == "randwrite"
    assert job["job options"]["iodepth"] == "4"
    assert job["job options"]["bs"] == "4096"
    assert job["write"]["clat_ns"]["percentile"]["50.000000"] > 0
    assert "memory" in data["virtblk"]["target"]


def test_bench_on_a_file(tmp_path: Path) -> None:
    image = tmp_path / "bench.img"
    result = run_virtblk(
        "bench", "--runtime", "0.5", "--iodepth", "2", "--rw", "write", "--backend", "file",
        "--file", str(image), "--device-size", "8M", "--output-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs"][0]["write"]["iops"] > 0
    assert image.stat().st_size == 8 << 20


@pytest.mark.parametrize(
    "args",
    [["info", "SOCK"], ["check", "--read-only", "SOCK"], ["bench", "--runtime", "0.1", "SOCK"],
     ["control", "SOCK", "stats"]],
    ids=["info", "check", "bench", "control"],
)  # fmt: skip
def test_a_missing_socket_names_its_errno_once(args: list[str], tmp_path: Path) -> None:
    """unixsock.connect already puts the path and the reason in the message; a wrapper
    that formats the whole OSError again repeats the ``[Errno 2]``."""
    missing = str(tmp_path / "nobody.sock")
    result = run_virtblk(*(missing if arg == "SOCK" else arg for arg in args))
    assert result.returncode == 1, result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("Error:"))
    assert missing in error
    assert error.count("[Errno 2]") == 1, error
    assert "No such file or directory" in error
