"""Run a test's work on several threads at once (two writers on two queues, say)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(work: Callable[[int], None], count: int, timeout: float = 60.0) -> None:
    """Run ``work(0)`` ... ``work(count - 1)`` each on a thread of its own and wait for all.

    Fails (AssertionError) when a thread is still running after ``timeout`` seconds, and
    re-raises the first error a thread raised: an exception on a thread is otherwise only
    printed, and the test would pass."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"a thread ran past {timeout} s"
    if errors:
        raise errors[0]
