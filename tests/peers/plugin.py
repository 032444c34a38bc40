"""The pytest side of the peers package: the never-skip rule, the leftover-process check,
Hypothesis's profiles and the fixtures.

tests/conftest.py loads this module with `pytest_plugins`, so the conftest stays
a one-liner and both rules can be tested by loading this plugin in a child pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from .ceph import POOL, CephCluster, CephError
from .guest import GuestError, GuestKernel, prepare_guest_kernel
from .leftovers import SESSION_ENV, Leftover, descendants, kill, tagged_processes
from .nbd import NbdServer
from .qsd import QemuStorageDaemon, short_socket_dir

#: Tests with these markers exercise a real peer; not running them is a failure.  So is
#: every test of a module in a directory of these names (tests/interop, tests/guest).
MUST_RUN_MARKERS = ("interop", "guest")

#: A module that marks any of its tests so: skipping the whole module is a failure too.
_MUST_RUN_MARK = re.compile(rf"\bmark\.(?:{'|'.join(MUST_RUN_MARKERS)})\b")

#: The environment variable that names the Hypothesis profile to load (scripts/test sets
#: it to "ci"; a set ``CI`` chooses "ci" too).  ``--hypothesis-profile`` still wins.
PROFILE_ENV = "VIRTBLK_HYPOTHESIS_PROFILE"

# "ci": the same examples on every run, so a red CI run fails again on a developer's
# machine, and a failure prints the blob that replays it (@reproduce_failure); neither a
# deadline nor the too-slow health check fails a test on a loaded machine.  "dev" explores
# new examples on each run and prints the blob too.
# Registered at import, before Hypothesis reads --hypothesis-profile in pytest_configure.
settings.register_profile(
    "ci", derandomize=True, print_blob=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get(PROFILE_ENV) or ("ci" if os.environ.get("CI") else "dev"))

#: The session's tag and the value the variable had before it (a session run in-process
#: by pytester puts the outer one back).
_SESSION_TAG = pytest.StashKey[tuple[str, str | None]]()

#: The processes below this one when the session began, as (pid, start): not the session's.
#: Empty for a session of its own; a session that pytester runs in-process shares the
#: outer session's process, and must not count (and kill) what the outer one started.
_BEFORE = pytest.StashKey[frozenset[tuple[int, int]]]()


def pytest_configure(config: pytest.Config) -> None:
    """Declare the markers, tag every program the tests will run, and note what already runs
    below this process (see `leftovers`)."""
    config.addinivalue_line("markers", "interop: against a real peer (must run, never skip)")
    config.addinivalue_line("markers", "guest: a Linux guest under QEMU (must run, never skip)")
    config.stash[_BEFORE] = frozenset((p.pid, p.started) for p in descendants(os.getpid()))
    # A fresh tag, never one inherited: a child pytest (pytester's subprocess runs) gets
    # the outer session's tag in its environment, and reusing it would list the outer
    # session's processes, the outer pytest itself included.
    tag = uuid.uuid4().hex
    config.stash[_SESSION_TAG] = (tag, os.environ.get(SESSION_ENV))
    os.environ[SESSION_ENV] = tag


def pytest_unconfigure(config: pytest.Config) -> None:
    _, previous = config.stash[_SESSION_TAG]
    if previous is None:
        os.environ.pop(SESSION_ENV, None)
    else:
        os.environ[SESSION_ENV] = previous


def _must_run(item: pytest.Item) -> list[str]:
    """Why a test must run (its markers, or its module's directory); empty when it may skip."""
    reasons = [f"marked {name}" for name in MUST_RUN_MARKERS if item.get_closest_marker(name)]
    if not reasons and item.path.parent.name in MUST_RUN_MARKERS:
        reasons.append(f"in {item.path.parent.name}/")
    return reasons


def _must_run_module(path: Path) -> bool:
    """Whether a module must be collected: it lies in tests/interop or tests/guest, or marks
    some of its tests interop/guest.  Read from the source: a module skipped while it is
    imported has no tests to look at."""
    if path.parent.name in MUST_RUN_MARKERS:
        return True
    try:
        return bool(_MUST_RUN_MARK.search(path.read_text(errors="replace")))
    except OSError:
        return False


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Report a must-run module skipped while it is imported (a module-level `pytest.skip`,
    `pytest.importorskip`) as a collection error: its tests would vanish unnoticed."""
    report = yield
    if report.skipped and isinstance(collector, pytest.Module) and _must_run_module(
        collector.path
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{collector.nodeid} holds tests that must run (interop/guest), but the module "
            f"was skipped: {_reason(report)}"
        )
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report a skipped or expected-to-fail (xfail) interop/guest test as failed, keeping
    the reason.

    A peer that cannot run (missing binary, no kernel) must turn the suite red, not
    quietly shrink it; a known failure against a peer is a failure until it is fixed.
    """
    report = yield
    reasons = _must_run(item)
    if not reasons:
        return report
    if hasattr(report, "wasxfail"):
        # Left on the report, it would keep the failure out of the session's count.
        reason = report.wasxfail
        del report.wasxfail
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is {' and '.join(reasons)} and must run and pass, but it is "
            f"expected to fail (xfail): {reason}"
        )
    elif report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is {' and '.join(reasons)} and must run, but it was skipped: "
            f"{_reason(report)}"
        )
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if a process a test started is still alive (after every fixture was
    torn down: this runs last), and kill it: whatever still runs below this process, and
    whatever carries the session's tag.

    A server or a QEMU left behind holds its image and its socket, and a forked job its
    share of the CPU; each says the test's cleanup is broken, and the next run would not
    notice it otherwise.
    """
    leftovers = _leftovers(session.config)
    if not leftovers:
        return
    survivors = kill(leftovers)
    lines = ["tests left these processes running (killed now):", *map(str, leftovers)]
    if survivors:
        lines.append(f"still alive after SIGKILL: {', '.join(map(str, survivors))}")
    message = "\n".join(lines)
    report = pytest.TestReport(
        nodeid="leftover processes", location=("leftover processes", None, "leftover processes"),
        keywords={}, outcome="failed", longrepr=message, when="teardown",
    )  # fmt: skip
    # Shown among the errors and counted in the last line; not through
    # pytest_runtest_logreport, which would print it as the progress of a test past 100 %.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.stats.setdefault("error", []).append(report)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _leftovers(config: pytest.Config) -> list[Leftover]:
    """The session's live processes: new below this one, or tagged; each once, by pid."""
    tag, _ = config.stash[_SESSION_TAG]
    before = config.stash[_BEFORE]
    found = {p.pid: p for p in descendants(os.getpid()) if (p.pid, p.started) not in before}
    for tagged in tagged_processes(tag):
        found.setdefault(tagged.pid, tagged)
    return sorted(found.values(), key=lambda leftover: leftover.pid)


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

    `qsd_factory(image=path | null_size=n | rbd="POOL/IMAGE", num_queues=.., writable=..,
    read_zeroes=.., logical_block_size=.., cache_direct=.., ceph_conf=.., ceph_id=..)`
    returns a started `QemuStorageDaemon` whose `socket_path` and `qmp_path` lie in a fresh
    short directory.  A daemon over an RBD image must be stopped before the `rbd_image`
    fixture removes the image: use a fixture that depends on both (test_qsd_rbd.py).
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
def ceph_cluster() -> Iterator[CephCluster]:
    """One Ceph cluster (a monitor, a memstore OSD, the pool ``rbd``) for the whole session;
    fails (never skips) when it cannot start.  Tests that pause its OSD resume it."""
    try:
        cluster = CephCluster().start()
    except (CephError, OSError) as error:
        pytest.fail(f"cannot start the Ceph cluster: {error}", pytrace=False)
    yield cluster
    cluster.stop()


RbdImageFactory = Callable[..., str]


@pytest.fixture
def rbd_image(ceph_cluster: CephCluster) -> Iterator[RbdImageFactory]:
    """Create RBD images in the session's cluster; each is removed when the test ends.

    ``rbd_image(size=64 MiB)`` returns a fresh image's ``POOL/NAME``; ``size=None`` only
    names one (for a test that creates it), removed afterwards if it exists then.  Stop
    what uses an image within the test (a ``with`` block): pytest may tear this fixture
    down before another that the test requested after it.
    """
    images: list[tuple[str, bool]] = []

    def create(size: int | None = 64 << 20) -> str:
        spec = f"{POOL}/t{uuid.uuid4().hex[:12]}"
        if size is not None:
            ceph_cluster.rbd("create", "--size", f"{size}B", spec)
        images.append((spec, size is not None))
        return spec

    yield create
    for spec, created in images:
        if created or spec.split("/", 1)[1] in ceph_cluster.rbd("ls", POOL).split():
            _remove_image(ceph_cluster, spec)


def _remove_image(cluster: CephCluster, spec: str, timeout: float = 60.0) -> None:
    """``rbd rm``, retried while the image still has a watcher: a client that was killed
    keeps its watch until the OSD times it out (30 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.rbd("rm", "--no-progress", spec)
            return
        except CephError as error:
            if "watchers" not in str(error):
                raise
            if time.monotonic() > deadline:
                status = cluster.rbd("status", spec)
                raise CephError(f"{error}\n{status}\n{cluster.logs()}") from None
            time.sleep(1)


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The prepared guest kernel and base initramfs; fails (never skips) when unavailable."""
    try:
        return prepare_guest_kernel()
    except (GuestError, OSError) as error:
        pytest.fail(f"cannot prepare the Linux guest kernel: {error}", pytrace=False)


NbdServerFactory = Callable[..., NbdServer]


@pytest.fixture
def nbd_server(sock_dir: Path) -> Iterator[NbdServerFactory]:
    """Start NBD servers (peers/nbd.py); each is stopped when the test ends.

    ``nbd_server(QemuNbd, image, tcp=.., export=.., read_only=.., shared=..)`` or
    ``nbd_server(NbdkitMemory, size, tcp=.., read_only=.., filters=.., log_requests=..)``
    (or ``Nbdkit``, a plugin and its arguments) returns the started server,
    on a Unix socket in a fresh short directory unless ``tcp=True``."""
    servers: list[NbdServer] = []

    def start(kind: Callable[..., NbdServer], *args: Any, tcp: bool = False,
              **options: Any) -> NbdServer:
        path = None if tcp else sock_dir / f"nbd-{len(servers)}.sock"
        server = kind(*args, socket_path=path, tcp=tcp, **options)
        servers.append(server)
        return server.start()

    yield start
    for server in reversed(servers):
        server.close()
