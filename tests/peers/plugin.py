"""The pytest side of the peers package: the never-skip rule and the fixtures.

tests/conftest.py loads this module with `pytest_plugins`, so the conftest stays
a one-liner and the rule can be tested by loading this plugin in a child pytest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .guest import GuestError, GuestKernel, prepare_guest_kernel
from .qsd import QemuStorageDaemon, short_socket_dir

#: Tests with these markers exercise a real peer; not running them is a failure.
MUST_RUN_MARKERS = ("interop", "guest")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report a skipped interop/guest test as failed, keeping the skip reason.

    A peer that cannot run (missing binary, no kernel) must turn the suite red,
    not quietly shrink it. Expected failures (xfail) are left alone.
    """
    report = yield
    markers = [name for name in MUST_RUN_MARKERS if item.get_closest_marker(name)]
    if report.skipped and markers and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is marked {'/'.join(markers)} and must run, but it was skipped: "
            f"{reason}"
        )
    return report


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory under /tmp for Unix sockets (tmp_path is too long for sun_path)."""
    path = short_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


QsdFactory = Callable[..., QemuStorageDaemon]


@pytest.fixture
def qsd_factory(sock_dir: Path) -> Iterator[QsdFactory]:
    """Start qemu-storage-daemon exports; every daemon is stopped when the test ends.

    `qsd_factory(image=path | null_size=n, num_queues=.., writable=.., read_zeroes=..,
    logical_block_size=.., cache_direct=..)` returns a started `QemuStorageDaemon`
    whose `socket_path` and `qmp_path` lie in a fresh short directory.
    """
    daemons: list[QemuStorageDaemon] = []

    def start(**options: Any) -> QemuStorageDaemon:
        index = len(daemons)
        daemon = QemuStorageDaemon(
            sock_dir / f"vhost-user-{index}.sock",
            qmp_path=sock_dir / f"qmp-{index}.sock",
            **options,
        )
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in reversed(daemons):
        daemon.stop()


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The prepared guest kernel and base initramfs; fails (never skips) when unavailable."""
    try:
        return prepare_guest_kernel()
    except (GuestError, OSError) as error:
        pytest.fail(f"cannot prepare the Linux guest kernel: {error}", pytrace=False)
