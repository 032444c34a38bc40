"""Run the real ``virtblk`` command as a child process (``virtblk serve``, ``info``, ...).

The interop, guest and CLI tests all use the installed console script, not click's
in-process runner: signal handling, exit codes and the socket file are part of what is
tested.  Import as ``from interop.serve_process import ServeProcess, virtblk_argv``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from peers.leftovers import Leftover, describe
from peers.process import accepts, kill_group, process_group, wait_ready

#: How long ``virtblk serve`` may take to listen (it imports numpy, on a busy machine).
START_TIMEOUT = 30.0

#: How long it may take to exit after SIGTERM (it finishes the requests in flight).
STOP_TIMEOUT = 20.0

#: How long killed processes may take to vanish (the kernel tears down their memory).
KILL_TIMEOUT = 10.0


def virtblk_argv(*args: str) -> list[str]:
    """The command line of the installed ``virtblk`` script next to this interpreter."""
    script = Path(sys.executable).parent / "virtblk"
    if not script.exists():
        raise FileNotFoundError(f"{script} is missing: pip install -e '.[dev]'")
    return [str(script), *args]


def run_virtblk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``virtblk ARGS`` to completion and capture its output (text)."""
    return subprocess.run(
        virtblk_argv(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


class LeftRunning(RuntimeError):
    """The server exited, but processes of its group outlived it (they are killed now)."""

    def __init__(self, status: int, leftovers: list[Leftover]) -> None:
        self.status = status
        self.leftovers = leftovers
        super().__init__("\n".join([
            f"virtblk serve exited with status {status} but left these processes of its "
            "group running (killed now):", *(f"  {leftover}" for leftover in leftovers),
        ]))  # fmt: skip


class ServeProcess:
    """``virtblk serve --socket PATH ARGS`` in a child process, ready once it listens.

    The child leads a process group of its own, and every signal goes to the group: under
    ``strace -o FILE`` (``argv`` may be wrapped so) strace ignores SIGTERM and a kill hits
    only strace, while its tracee and the server's queue worker processes are in the group.

    A context manager: ``__exit__`` sends SIGTERM and waits ``stop_timeout`` seconds, then
    kills whatever of the group is left.  The block fails (``RuntimeError`` with the
    server's output) when the server did not exit in time, exited with a non-zero status,
    or exited leaving processes of its group running (its queue workers, say: the
    session-end check would never see them, killed here), unless the block is already
    failing with an exception of its own.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        args: Sequence[str],
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.argv = virtblk_argv("serve", "--socket", str(self.socket_path), *args)
        self.stop_timeout = stop_timeout
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def start(self) -> ServeProcess:
        """Start the server and wait until it listens; a server that cannot is stopped (its
        whole group) and ``RuntimeError`` says why."""
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True,
        )
        try:
            rc = wait_ready(
                self.process, lambda: accepts(self.socket_path), START_TIMEOUT, interval=0.05
            )
        except TimeoutError:
            self._fail_start(f"virtblk serve not listening after {START_TIMEOUT} s")
        if rc is not None:
            self._fail_start(f"virtblk serve exited with {rc} before listening")
        return self

    def _fail_start(self, why: str) -> NoReturn:
        """Stop a server that could not start and raise ``RuntimeError`` saying why, with
        what it left running, if anything, and its output."""
        try:
            self.stop()
        except LeftRunning as left:
            why = f"{why}; {left}"
        raise RuntimeError(f"{why}:\n{self.output}") from None

    def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM to its process group and wait (``stop_timeout`` by default); return the
        exit status.  Whatever of the group outlives the server is killed, and is gone when
        this returns.  Raises ``subprocess.TimeoutExpired`` when the server did not exit in
        time (it is killed first), and `LeftRunning` when it exited but left processes of
        its group running."""
        assert self.process is not None
        if timeout is None:
            timeout = self.stop_timeout
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            raise
        # Read before the kill: a server that exits must have stopped what it started.
        leftovers = describe(process_group(self.process.pid))
        self._kill_group()
        if leftovers:
            raise LeftRunning(status, leftovers)
        return status

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the group, reap the server, and wait until the group
        is gone."""
        assert self.process is not None
        kill_group(self.process, KILL_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the server's whole group, as a crash would (queue workers included), and
        wait until it is gone.  The server then counts as stopped (a killed status is no
        failure of the ``with`` block), and ``start`` runs it again on the same socket."""
        self._kill_group()
        self.process = None

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass  # the group is empty: everything has exited

    def stop(self) -> int | None:
        """Stop the server as ``terminate`` does, for cleanup paths: the exit status, or None
        when it had to be killed (or never started).  `LeftRunning` still propagates: in a
        ``finally`` it is chained to the test's own exception, and hides neither."""
        if self.process is None:
            return None
        try:
            return self.terminate()
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure = None
        try:
            if self.process is not None:
                try:
                    rc = self.terminate()
                except subprocess.TimeoutExpired:
                    failure = (f"virtblk serve did not exit within {self.stop_timeout:g} s of "
                               f"SIGTERM (killed):\n{self.output}")
                except LeftRunning as left:
                    failure = f"{left}\n{self.output}"
                else:
                    if rc != 0:
                        failure = f"virtblk serve exited with status {rc}:\n{self.output}"
        finally:
            self._log.close()
        # The block's own exception says more than the server's end, which it likely caused.
        if failure is not None and exc_type is None:
            raise RuntimeError(failure)
