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

from peers.process import accepts, wait_ready

#: How long ``virtblk serve`` may take to listen (it imports numpy, on a busy machine).
START_TIMEOUT = 30.0


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


class ServeProcess:
    """``virtblk serve --socket PATH ARGS`` in a child process, ready once it listens.

    A context manager: ``__exit__`` sends SIGTERM and waits (SIGKILL after 20 s).
    """

    def __init__(self, socket_path: str | os.PathLike[str], args: Sequence[str]) -> None:
        self.socket_path = Path(socket_path)
        self.argv = virtblk_argv("serve", "--socket", str(self.socket_path), *args)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def start(self) -> ServeProcess:
        # A session of its own: stopping it stops everything it started (its queue
        # worker processes, and the server itself when it runs under strace).
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True,
        )
        try:
            rc = wait_ready(
                self.process, lambda: accepts(self.socket_path), START_TIMEOUT, interval=0.05
            )
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"virtblk serve not listening after {START_TIMEOUT} s") from None
        if rc is not None:
            raise RuntimeError(f"virtblk serve exited with {rc} before listening:\n{self.output}")
        return self

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM to its process group and wait; return the exit status (SIGKILL when it
        does not exit).  Whatever of the group outlives it is killed."""
        assert self.process is not None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass  # the group is empty: everything has exited

    def stop(self) -> int | None:
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
        self.stop()
        self._log.close()
