"""``ServeProcess`` itself: whatever it started is gone when its block ends, and a server
that died, failed or would not stop makes the block fail.

The harness is proved against the real ``virtblk serve`` (and the real ``strace``), since
that is what it runs for every other test here; only a server that leaves processes behind
is a stand-in, since the real one does not (that is what the harness checks).
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.process import process_group, process_state

pytestmark = pytest.mark.interop


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except FileNotFoundError:
        return []


def _served_pid(group: list[int]) -> int:
    """The ``virtblk serve`` process in a group (strace's tracee, when it runs under strace):
    the interpreter running the ``virtblk`` script with ``serve``."""
    (pid,) = [pid for pid in group
              if (argv := _argv(pid))[1:3] and Path(argv[1]).name == "virtblk"
              and argv[2] == "serve"]
    return pid


def _gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z")


def test_a_server_under_strace_is_gone_after_its_block(sock_dir: Path, tmp_path: Path) -> None:
    """strace -o FILE blocks fatal signals: a SIGTERM to strace alone does nothing, and
    killing strace leaves its tracee running.  Signalling the group stops the server."""
    sp = ServeProcess(sock_dir / "vb.sock", ["--memory", "1M", "--num-queues", "2"])
    sp.argv = ["strace", "-f", "-qq", "-o", str(tmp_path / "trace"), *sp.argv]
    with sp:
        assert sp.process is not None
        leader = sp.process.pid
        members = process_group(leader)
        served = _served_pid(members)
        assert served != leader and _argv(leader)[0] == "strace"
    assert process_group(leader) == [], [_argv(pid) for pid in process_group(leader)]
    assert all(_gone(pid) for pid in members)
    assert _gone(served)
    assert (tmp_path / "trace").read_text()  # strace really traced it


def test_a_server_that_died_makes_the_block_fail(sock_dir: Path) -> None:
    """A server killed under the test (a crash, say) exits with a signal: not a pass."""
    with (
        pytest.raises(RuntimeError, match="exited with status -9"),
        ServeProcess(sock_dir / "vb.sock", ["--memory", "1M"]) as sp,
    ):
        assert sp.process is not None
        os.kill(sp.process.pid, signal.SIGKILL)
        sp.process.wait()


def test_a_failure_inside_the_block_is_not_masked(sock_dir: Path) -> None:
    """The test's own exception is what propagates, not the server's exit status."""
    with (
        pytest.raises(LookupError, match="the test's own failure"),
        ServeProcess(sock_dir / "vb.sock", ["--memory", "1M"]) as sp,
    ):
        assert sp.process is not None
        os.kill(sp.process.pid, signal.SIGKILL)
        raise LookupError("the test's own failure")


def test_a_server_that_does_not_stop_makes_the_block_fail(sock_dir: Path) -> None:
    """A stopped server cannot act on SIGTERM: past the stop timeout it is killed, its
    whole group with it, and the block fails saying so."""
    sp = ServeProcess(sock_dir / "vb.sock", ["--memory", "1M"], stop_timeout=1)
    with pytest.raises(RuntimeError, match="did not exit within 1 s"), sp:
        assert sp.process is not None
        leader = sp.process.pid
        os.kill(leader, signal.SIGSTOP)
    assert process_group(leader) == []


#: A stand-in for a ``virtblk serve`` that exits 0 on SIGTERM but leaves a process of its
#: group running: it starts ``sleep`` with SIGTERM ignored (an ignored signal stays ignored
#: across exec), as a queue worker ignores the SIGTERM sent to the group and waits for its
#: server to say stop; then it listens on the socket, so ``start`` returns.
_LEAVES_A_SLEEP = textwrap.dedent("""
    import signal, socket, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen(["sleep", "30"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1])
    listener.listen()
    while True:
        signal.pause()
""")


def test_a_server_that_exits_cleanly_but_leaves_its_group_running_fails(
    sock_dir: Path,
) -> None:
    """Exiting 0 is not enough: whatever of its group the server left running is named,
    killed, and fails the block (the session-end check would never see it)."""
    sp = ServeProcess(sock_dir / "vb.sock", [])
    sp.argv = [sys.executable, "-c", _LEAVES_A_SLEEP, str(sp.socket_path)]
    members: list[int] = []
    with pytest.raises(RuntimeError, match=r"exited with status 0 but left") as failure, sp:
        assert sp.process is not None
        leader = sp.process.pid
        members = [pid for pid in process_group(leader) if pid != leader]
    (sleep,) = members
    assert f"pid {sleep}: sleep 30" in str(failure.value)
    assert _gone(sleep)
    assert process_group(leader) == []
