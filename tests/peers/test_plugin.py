"""The peers plugin (tests/peers/plugin.py) run on small child sessions (pytester): what it
must turn into a failure, and what it must leave alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peers.process import process_state


def _run(pytester: pytest.Pytester, **modules: str) -> pytest.RunResult:
    """A child session over ``modules`` (name -> source; "interop/test_x" makes a
    directory) with only the peers plugin loaded."""
    pytester.makepyfile(**{name: textwrap.dedent(source) for name, source in modules.items()})
    return pytester.runpytest("-p", "peers.plugin", "-p", "no:cacheprovider", "-rA")


# -- the never-skip rule -------------------------------------------------------------------

PASSING = """
    import pytest

    @pytest.mark.interop
    def test_against_the_peer():
        assert True
"""


def test_a_must_run_module_that_runs_passes(pytester: pytest.Pytester) -> None:
    result = _run(pytester, **{"interop/test_peer": PASSING})
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_plain_tests_may_still_skip_and_xfail(pytester: pytest.Pytester) -> None:
    result = _run(pytester, test_plain="""
        import pytest

        pytest.importorskip("no_such_module_here")
    """, test_other="""
        import pytest

        def test_skips():
            pytest.skip("plain tests may skip")

        @pytest.mark.xfail(reason="a known bug", strict=True)
        def test_known_bug():
            assert False
    """)
    result.assert_outcomes(skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_a_module_level_skip_in_a_peer_directory_fails(pytester: pytest.Pytester) -> None:
    result = _run(pytester, **{"interop/test_peer": """
        import pytest

        pytest.skip("no daemon here", allow_module_level=True)

        def test_against_the_peer():
            pass
    """})
    assert result.ret != pytest.ExitCode.OK
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*must run (interop/guest), but the module was skipped*"])
    result.stdout.fnmatch_lines(["*no daemon here*"])


def test_an_importorskip_in_a_module_with_marked_tests_fails(pytester: pytest.Pytester) -> None:
    """Outside tests/interop and tests/guest, a module is must-run when it marks a test."""
    result = _run(pytester, test_mixed="""
        import pytest

        no_such = pytest.importorskip("no_such_module_here")

        @pytest.mark.guest
        def test_in_a_guest():
            pass

        def test_plain():
            pass
    """)
    assert result.ret != pytest.ExitCode.OK
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*must run (interop/guest)*no_such_module_here*"])


def test_a_call_to_pytest_xfail_in_a_guest_test_fails(pytester: pytest.Pytester) -> None:
    result = _run(pytester, test_guest="""
        import pytest

        @pytest.mark.guest
        def test_in_a_guest():
            pytest.xfail("the guest is flaky")
    """)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*marked guest and must run and pass*the guest is flaky*"])


@pytest.mark.parametrize("body", ["assert False", "assert True"], ids=["xfail", "xpass"])
def test_an_xfail_mark_on_an_interop_test_fails(pytester: pytest.Pytester, body: str) -> None:
    """Whether the test then fails (xfailed) or passes (xpassed, not strict)."""
    result = _run(pytester, **{"interop/test_peer": f"""
        import pytest

        @pytest.mark.xfail(reason="a known bug")
        def test_against_the_peer():
            {body}
    """})
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*in interop/ and must run and pass*a known bug*"])


def test_skips_in_setup_and_call_of_marked_tests_fail(pytester: pytest.Pytester) -> None:
    result = _run(pytester, test_marked="""
        import pytest

        @pytest.mark.interop
        def test_interop_skips_in_call():
            pytest.skip("no daemon here")

        @pytest.mark.guest
        @pytest.mark.skipif(True, reason="no kernel here")
        def test_guest_skips_in_setup():
            pass
    """)
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(["*marked interop and must run, but*skipped*no daemon here*"])
    result.stdout.fnmatch_lines(["*marked guest and must run, but it was skipped*no kernel here*"])


# -- the leftover-process check ------------------------------------------------------------

#: Looks like ``virtblk serve`` in ps: an interpreter running a script named virtblk.
FAKE_SERVE = "import time\ntime.sleep(600)\n"


def test_a_process_left_running_fails_the_run_and_is_killed(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Started in a session of its own by a parent that then exits (as a daemon does), so
    it is reparented and no walk down from pytest finds it: the environment tag does."""
    script = tmp_path / "virtblk"
    script.write_text(FAKE_SERVE)
    pidfile = tmp_path / "pid"
    result = _run(pytester, test_leak=f"""
        import os, subprocess, sys
        from peers.leftovers import descendants

        DAEMONIZE = (
            "import subprocess, sys\\n"
            "server = subprocess.Popen(sys.argv[1:], start_new_session=True,\\n"
            "                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\\n"
            "print(server.pid)\\n"
        )

        def test_leaves_a_server_behind():
            started = subprocess.run(
                [sys.executable, "-c", DAEMONIZE, sys.executable, {str(script)!r}, "serve"],
                capture_output=True, text=True, check=True)
            open({str(pidfile)!r}, "w").write(started.stdout)
            assert int(started.stdout) not in [p.pid for p in descendants(os.getpid())]
    """)
    pid = int(pidfile.read_text())
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*tests left these processes running (killed now):*",
        f"*pid {pid}: {sys.executable} {script} serve*",
    ])  # fmt: skip
    assert process_state(pid) in (None, "Z")


def test_a_child_forked_without_exec_fails_the_run_and_is_killed(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """A forked child runs with the environment its parent was exec'd with, which lacks the
    tag the session put into os.environ: the walk down from the pytest process finds it."""
    pidfile = tmp_path / "pid"
    try:
        result = _run(pytester, test_fork=f"""
            import os, time

            def test_forks_a_worker_and_forgets_it():
                pid = os.fork()
                if pid == 0:
                    try:
                        time.sleep(600)
                    finally:
                        os._exit(0)
                open({str(pidfile)!r}, "w").write(str(pid))
        """)
        pid = int(pidfile.read_text())
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines([
            "*tests left these processes running (killed now):*", f"*pid {pid}: *",
        ])  # fmt: skip
        # Killed and reaped (it is a child of this process: pytester runs in-process).
        assert process_state(pid) is None
    finally:
        # Without the check the child would sleep on, a child of this very process.
        if pidfile.exists() and process_state(pid := int(pidfile.read_text())) is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_process_a_test_stops_is_not_a_leftover(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    script = tmp_path / "virtblk"
    script.write_text(FAKE_SERVE)
    result = _run(pytester, test_clean=f"""
        import subprocess, sys

        def test_stops_its_server():
            server = subprocess.Popen([sys.executable, {str(script)!r}, "serve"])
            server.kill()
            server.wait()
    """)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_an_inner_session_leaves_the_outer_sessions_processes_alone(
    pytester: pytest.Pytester,
) -> None:
    """pytester runs the inner session in this process: what already ran below it when
    that session began is not the inner session's to count or kill."""
    outer = subprocess.Popen(["sleep", "600"])
    try:
        result = _run(pytester, test_nothing="""
            def test_starts_nothing():
                pass
        """)
        result.assert_outcomes(passed=1)
        assert result.ret == pytest.ExitCode.OK
        assert outer.poll() is None
    finally:
        outer.kill()
        outer.wait()


# -- Hypothesis's profiles -----------------------------------------------------------------

PROPERTY = """
    from hypothesis import given, settings, strategies as st

    def test_profile():
        print("PROFILE", settings.default.derandomize, settings.default.database,
              settings.default.deadline, settings.default.print_blob)

    @given(st.integers())
    def test_small(x):
        assert x < 1000
"""


@pytest.mark.parametrize(("env", "expected"), [
    ({"VIRTBLK_HYPOTHESIS_PROFILE": "ci"}, "PROFILE True None None True"),
    ({"CI": "true"}, "PROFILE True None None True"),
    ({}, "PROFILE False *"),
], ids=["scripts-test", "ci", "developer"])  # fmt: skip
def test_the_hypothesis_profile_is_deterministic_in_ci_and_prints_the_blob(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str], expected: str,
) -> None:
    """A child interpreter: the profile is chosen when the plugin is imported."""
    for name in ("CI", "VIRTBLK_HYPOTHESIS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tests = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        tests, os.environ.get("PYTHONPATH")])))  # fmt: skip
    pytester.makepyfile(test_property=textwrap.dedent(PROPERTY))
    result = pytester.runpytest_subprocess("-p", "peers.plugin", "-p", "no:cacheprovider",
                                           "-s")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"*{expected}*"])
    result.stdout.fnmatch_lines(["*Falsifying example: test_small(*", "*@reproduce_failure(*"])
