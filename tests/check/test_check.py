"""``virtblk check`` against our device and qemu-storage-daemon.

Our device must pass every check for what it offers (the one warning is a question the
spec leaves open); a device that breaks a rule must make the right check fail; the data
the checks touch must be restored; qemu-storage-daemon's known quirks must show as the
findings they are.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from interop.serve_process import ServeProcess, run_virtblk
from peers.plugin import QsdFactory
from virtblk.cli.main import main
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.request import BlkRequest
from virtblk.errors import DeviceGoneError
from virtblk.spec import Lifetime, RequestType, Status
from virtblk.tools.check import CHECKS, Outcome, Report, run_checks
from virtblk.tools.check.runner import ordered_checks, ring_checks
from virtblk.vhost_user.server import VhostUserServer

MiB = 1 << 20
SIZE = 16 * MiB

WRITE_CHECKS = {c.id for c in CHECKS if c.writes}

OUR_WARNINGS = {"unsupp.not-negotiated"}
"""Our device executes a FLUSH whose feature was not negotiated; the spec is silent."""


@contextlib.contextmanager
def serving(path: Path, device: BlkDevice) -> Iterator[VhostUserServer]:
    """Our device on a listening socket, served from a thread."""
    server = VhostUserServer(str(path), device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=10)


def outcomes(report: Report, outcome: Outcome) -> set[str]:
    return {r.id for r in report.results if r.outcome is outcome}


def pattern(size: int) -> bytes:
    return bytes((i * 31 + 7) % 256 for i in range(size))


def fill(backend: MemoryBackend, data: bytes) -> None:
    backend.pwritev([memoryview(data)], 0)


def contents(backend: MemoryBackend) -> bytes:
    buf = bytearray(backend.size)
    backend.preadv([memoryview(buf)], 0)
    return bytes(buf)


# ---------------------------------------------------------------------------- our device


def test_our_device_passes_everything_it_offers(sock_dir: Path) -> None:
    backend = MemoryBackend(SIZE)
    original = pattern(SIZE)
    fill(backend, original)
    device = BlkDevice(
        backend,
        serial="virtblk-check",
        size_max=64 * 1024,
        geometry=(32, 16, 63),
        lifetime=Lifetime(Lifetime.PRE_EOL_NORMAL, 2, 3),
    )
    with serving(sock_dir / "own.sock", device):
        report = run_checks(sock_dir / "own.sock", timeout=10)
    assert not report.failed, [r for r in report.results if r.outcome is Outcome.FAIL]
    # The request checks ran over both rings, with the same findings.
    assert outcomes(report, Outcome.WARN) == OUR_WARNINGS | {f"packed.{i}" for i in OUR_WARNINGS}
    # Skipped: only what this device does not offer.
    assert outcomes(report, Outcome.SKIP) == {"io.read-only", "packed.io.read-only"}
    for ring_check in ring_checks():
        assert report.result(ring_check.id).outcome is report.result(
            ring_check.id.removeprefix("packed.")).outcome
    # The hostile packed rings: left alone, or answered, and the device served on.
    assert "left alone" in report.result("packed.wrap-bits").detail
    assert "same ring served" in report.result("packed.id-range").detail
    assert "answered with length 0" in report.result("packed.endless-chain").detail
    assert "'virtblk-check'" in report.result("io.get-id").detail
    assert "pre_eol_info 1" in report.result("io.get-lifetime").detail
    assert report.result("malformed.bad-address").outcome is Outcome.PASS
    # Every check that wrote put the data back.
    assert contents(backend) == original


def test_our_read_only_device_refuses_writes_and_skips_write_checks(sock_dir: Path) -> None:
    backend = MemoryBackend(SIZE)
    original = pattern(SIZE)
    fill(backend, original)
    with serving(sock_dir / "ro.sock", BlkDevice(backend, read_only=True)):
        report = run_checks(sock_dir / "ro.sock", timeout=10)
    assert not report.failed
    ro = report.result("io.read-only")
    assert ro.outcome is Outcome.PASS and "IOERR" in ro.detail
    skipped = outcomes(report, Outcome.SKIP)
    assert "io.round-trip" in skipped and "io.write-zeroes" in skipped
    assert "BLK_RO" in report.result("io.round-trip").detail
    assert contents(backend) == original


def test_read_only_run_sends_no_writes(sock_dir: Path) -> None:
    backend = MemoryBackend(SIZE)
    device = BlkDevice(backend)
    with serving(sock_dir / "own.sock", device):
        report = run_checks(sock_dir / "own.sock", allow_writes=False, timeout=10)
    assert not report.failed
    assert outcomes(report, Outcome.SKIP) >= WRITE_CHECKS
    stats = device.stats()
    requests = stats["requests"]
    assert isinstance(requests, dict)
    assert not {"OUT", "DISCARD", "WRITE_ZEROES", "SECURE_ERASE"} & set(requests)
    assert stats["bytes_written"] == 0


def test_only_selects_checks_by_prefix(sock_dir: Path) -> None:
    with serving(sock_dir / "own.sock", BlkDevice(MemoryBackend(SIZE))):
        report = run_checks(sock_dir / "own.sock", only=["range."], timeout=10)
    ids = [r.id for r in report.results]
    # ``range.`` selects the range checks over both rings.
    assert ids and all(i.removeprefix("packed.").startswith("range.") for i in ids)
    assert {i for i in ids if i.startswith("packed.")} == {f"packed.{i}" for i in ids
                                                           if not i.startswith("packed.")}
    assert outcomes(report, Outcome.PASS) == set(ids)


def test_only_packed_selects_the_packed_runs_and_the_hostile_rings(sock_dir: Path) -> None:
    with serving(sock_dir / "own.sock", BlkDevice(MemoryBackend(SIZE))):
        report = run_checks(sock_dir / "own.sock", only=["packed."], timeout=10)
    ids = [r.id for r in report.results]
    assert all(i.startswith("packed.") for i in ids)
    assert {"packed.wrap-bits", "packed.id-range", "packed.endless-chain",
            "packed.io.round-trip"} <= set(ids)
    assert not report.failed


def test_a_device_hiding_packed_skips_the_packed_checks(sock_dir: Path) -> None:
    with serving(sock_dir / "own.sock", BlkDevice(MemoryBackend(SIZE), packed=False)):
        report = run_checks(sock_dir / "own.sock", only=["packed.", "io.read"], timeout=10)
    assert report.result("io.read").outcome is Outcome.PASS
    packed = [r for r in report.results if r.id.startswith("packed.")]
    assert packed and all(r.outcome is Outcome.SKIP and r.detail == "RING_PACKED not offered"
                          for r in packed)


# ---------------------------------------------------------------------------- broken devices


_KNOWN_TYPES = {int(t) for t in RequestType}


class _Misbehaving(BlkDevice):
    """A device that breaks one rule, chosen by ``fault``."""

    def __init__(self, backend: MemoryBackend, fault: str, **kwargs: Any) -> None:
        self.fault = fault
        super().__init__(backend, **kwargs)

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        if self.fault == "ok-for-unknown" and req.type not in _KNOWN_TYPES:
            return int(Status.OK), 1
        if self.fault == "lazy-write-zeroes" and req.type == RequestType.WRITE_ZEROES:
            return int(Status.OK), 1
        if self.fault == "ioerr-past-end-as-ok" and req.type == RequestType.IN:
            end = self.capacity * 512
            if req.sector * 512 + req.data_len > end:
                return int(Status.OK), req.data_len + 1
        return super().execute(req)

    def config(self) -> bytes:
        raw = bytearray(super().config())
        if self.fault == "dirty-padding":
            raw[33] = 0x5A
        return bytes(raw)


@pytest.mark.parametrize(
    ("fault", "check_ids"),
    [
        ("ok-for-unknown", {"unsupp.unknown-type"}),
        # Answers OK without zeroing, whatever the flags: unknown flags are accepted too.
        (
            "lazy-write-zeroes",
            {"io.write-zeroes", "io.write-zeroes-unmap", "malformed.unknown-flags"},
        ),
        ("ioerr-past-end-as-ok", {"range.past-end", "range.straddle", "range.overflow"}),
        ("dirty-padding", {"config.padding"}),
    ],
)
def test_a_broken_rule_fails_its_check(sock_dir: Path, fault: str, check_ids: set[str]) -> None:
    device = _Misbehaving(MemoryBackend(SIZE), fault)
    with serving(sock_dir / "bad.sock", device):
        report = run_checks(sock_dir / "bad.sock", timeout=10)
    assert report.failed
    # A request check fails over both rings (the device offers the packed one).
    ring_ids = {c.id.removeprefix("packed.") for c in ring_checks()}
    check_ids = check_ids | {f"packed.{i}" for i in check_ids & ring_ids}
    assert outcomes(report, Outcome.FAIL) == check_ids
    for check_id in check_ids:
        assert "expected" in report.result(check_id).detail


def test_cli_exit_status(sock_dir: Path) -> None:
    runner = CliRunner()
    path = str(sock_dir / "cli.sock")
    with serving(sock_dir / "cli.sock", _Misbehaving(MemoryBackend(SIZE), "ok-for-unknown")):
        bad = runner.invoke(main, ["check", path])
    with serving(sock_dir / "cli.sock", BlkDevice(MemoryBackend(SIZE))):
        good = runner.invoke(main, ["check", path])
    assert bad.exit_code == 1
    assert "unsupp.unknown-type" in bad.output and "fail" in bad.output
    assert good.exit_code == 0, good.output
    assert "writes to the device" in good.stderr  # the warning


def test_default_output_fits_80_columns_with_the_failures_explained(sock_dir: Path) -> None:
    """One line per check; what was seen and the spec section only under a failure."""
    path = str(sock_dir / "cli.sock")
    with serving(sock_dir / "cli.sock", _Misbehaving(MemoryBackend(SIZE), "ok-for-unknown")):
        result = CliRunner().invoke(main, ["check", path], env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()  # stdout and stderr
    too_wide = [line for line in lines if len(line) > 80]
    assert too_wide == []
    marks = {str(o) for o in Outcome}
    failing = next(i for i, line in enumerate(lines) if "unsupp.unknown-type" in line)
    assert lines[failing].startswith("fail")
    after = lines[failing + 1 :]
    under = after[: next(i for i, line in enumerate(after) if line[:4] in marks)]
    explained = " ".join(line.strip() for line in under)
    assert "request type 0x7e answered OK; expected UNSUPP" in explained
    assert "5.2.6 Device Operation" in explained
    named = [line.split()[1] for line in result.stdout.splitlines() if line[:4] in marks]
    # A line each, in run order: the split ring's run, then the packed ring's.
    assert named == [c.id for c in ordered_checks()] + [c.id for c in ring_checks()]
    # A passing check's finding is not shown.
    assert "ID '" not in result.output and "5.2.4 Device configuration" not in result.output


def test_verbose_shows_the_full_table(sock_dir: Path) -> None:
    path = str(sock_dir / "cli.sock")
    with serving(sock_dir / "cli.sock", BlkDevice(MemoryBackend(SIZE), serial="verbose")):
        result = CliRunner().invoke(main, ["check", "--verbose", path])
        short = CliRunner().invoke(main, ["check", "-v", "--only", "vu.", path])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "finding" in line)
    assert re.search(r"check\W+result\W+what\W+spec\W+finding", header), header
    assert "5.2.6.2 Device Requirements" in result.stdout
    assert "ID 'verbose'" in result.stdout  # a passing check's finding
    assert "finding" in short.stdout


def test_nothing_listening_is_an_error(sock_dir: Path) -> None:
    with pytest.raises(DeviceGoneError):
        run_checks(sock_dir / "nobody.sock")
    result = CliRunner().invoke(main, ["check", str(sock_dir / "nobody.sock")])
    assert result.exit_code == 1 and "cannot connect" in result.output


@pytest.mark.interop
def test_cli_json_against_virtblk_serve(sock_dir: Path) -> None:
    with ServeProcess(sock_dir / "serve.sock", ["--memory", "8M", "--serial", "served"]):
        done = run_virtblk("check", str(sock_dir / "serve.sock"), "--json", "--read-only")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["failed"] is False
    by_id = {c["id"]: c for c in data["checks"]}
    assert by_id["io.get-id"]["outcome"] == "pass" and "served" in by_id["io.get-id"]["detail"]
    assert by_id["io.round-trip"]["outcome"] == "skip"
    assert "VERSION_1" in data["features_offered"]
    assert "writes" not in done.stderr


# ---------------------------------------------------------------------------- qemu-storage-daemon


QSD_WARNINGS = {"config.seg-max", "io.get-id", "unsupp.not-negotiated", "malformed.bad-address"}
"""qemu-storage-daemon 7.2: SIZE_MAX with size_max 0; GET_ID writes 15 bytes and leaves
the rest of the buffer; it executes a FLUSH whose feature was not negotiated; it drops the
connection on a descriptor outside memory."""


def _check_qsd(qsd_factory: QsdFactory, **options: Any) -> Report:
    """A run against the daemon: it offers no packed ring, so every packed check (the
    request checks' second run and the hostile rings) is skipped, saying so."""
    daemon = qsd_factory(**options)
    report = run_checks(str(daemon.socket_path), timeout=10)
    packed = [r for r in report.results if r.id.startswith("packed.")]
    assert len(packed) == len(ring_checks()) + 3
    assert {(r.outcome, r.detail) for r in packed} == {(Outcome.SKIP, "RING_PACKED not offered")}
    return report


@pytest.mark.interop
def test_qsd_file_export(qsd_factory: QsdFactory, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    original = pattern(SIZE)
    image.write_bytes(original)
    report = _check_qsd(qsd_factory, image=image)
    assert not report.failed, [r for r in report.results if r.outcome is Outcome.FAIL]
    assert outcomes(report, Outcome.WARN) == QSD_WARNINGS
    get_id = report.result("io.get-id").detail
    assert "'vhost_user_blk'" in get_id and "NUL-padded" in get_id
    assert "dropped the connection" in report.result("malformed.bad-address").detail
    assert "60 bytes" in report.result("vu.get-config").detail
    assert report.result("io.round-trip").outcome is Outcome.PASS
    assert report.result("io.write-zeroes").outcome is Outcome.PASS
    assert report.result("malformed.discard-unmap").outcome is Outcome.PASS
    assert image.read_bytes() == original


@pytest.mark.interop
def test_qsd_null_export(qsd_factory: QsdFactory) -> None:
    report = _check_qsd(qsd_factory, null_size=SIZE)
    assert not report.failed
    # Writes vanish on null-co: the round trip reads zeroes, which is reported, not failed.
    assert outcomes(report, Outcome.WARN) == QSD_WARNINGS | {"io.round-trip"}
    assert "null device" in report.result("io.round-trip").detail


@pytest.mark.interop
def test_qsd_read_only_export(qsd_factory: QsdFactory, tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(pattern(SIZE))
    report = _check_qsd(qsd_factory, image=image, writable=False)
    assert not report.failed
    assert report.result("io.read-only").outcome is Outcome.PASS
    assert report.result("io.round-trip").outcome is Outcome.SKIP


def test_every_check_names_a_section() -> None:
    ids = [c.id for c in CHECKS]
    assert len(ids) == len(set(ids))
    for c in CHECKS:
        assert c.section and c.title, c.id
        assert c.section[0].isdigit() or c.section.startswith("vhost-user"), c.id


def test_checks_run_group_by_group_in_the_specs_order() -> None:
    """The groups run as they always did (negotiation first, malformed requests last): the
    registration order is the order ``virtblk.tools.check.checks`` imports its modules."""
    groups = [c.id.split(".")[0] for c in ordered_checks()]
    order = list(dict.fromkeys(groups))
    assert order == ["vu", "config", "flush", "io", "limits", "range", "unsupp", "malformed",
                     "packed"]
    assert groups == sorted(groups, key=order.index)  # each group in one run
