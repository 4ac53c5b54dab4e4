"""The test harness itself: its waits, its helper processes, its leak guard."""

import os
import signal
import subprocess

import psutil
import pytest

from realprocs import (
    HANDSHAKE_TIMEOUT,
    RUN_ENV_VAR,
    WaitTimeout,
    ignored_signals,
    is_gone,
    marked_processes,
    reap_leaks,
    sighup_ignored,
    wait_for,
)

SIGINT_BIT = 1 << (signal.SIGINT - 1)


def test_wait_for_returns_the_first_truthy_result():
    calls = iter([None, 0, "found"])

    assert wait_for(lambda: next(calls), timeout=5, what="a value", interval=0) == "found"


def test_wait_for_names_what_it_waited_for():
    with pytest.raises(WaitTimeout, match=r"timed out after 0.05 s waiting for the moon"):
        wait_for(lambda: False, timeout=0.05, what="the moon")


def test_plain_chain_is_attached_to_pytest(real_procs):
    chain = real_procs.spawn_chain()

    assert chain.child.ppid() == os.getpid()
    assert chain.grandchild.ppid() == chain.child.pid
    assert os.getpgid(chain.grandchild.pid) == os.getpgrp()
    assert not sighup_ignored(chain.child.pid)
    assert not sighup_ignored(chain.grandchild.pid)


def test_nohup_chain_ignores_sighup(real_procs):
    chain = real_procs.spawn_chain(nohup=True)

    assert chain.child.name() == "sh"
    assert sighup_ignored(chain.child.pid)
    assert sighup_ignored(chain.grandchild.pid)
    assert os.getsid(chain.child.pid) == os.getsid(0)


def test_setsid_chain_leads_its_own_session(real_procs):
    chain = real_procs.spawn_chain(setsid=True)

    assert os.getsid(chain.child.pid) == chain.child.pid
    assert os.getsid(chain.grandchild.pid) == chain.child.pid
    assert os.getpgid(chain.grandchild.pid) == chain.child.pid
    assert not sighup_ignored(chain.grandchild.pid)


def test_shell_background_job_ignores_sigint(real_procs):
    """POSIX: a non-interactive shell's ``&`` job ignores SIGINT and SIGQUIT."""
    chain = real_procs.spawn_chain()
    # The shell sets the job's dispositions between fork and exec, and $!
    # is known right after the fork: wait for the exec.
    wait_for(lambda: chain.grandchild.name() == "sleep", 10, "the background job to exec sleep")

    assert ignored_signals(chain.grandchild.pid) & SIGINT_BIT
    assert not ignored_signals(chain.child.pid) & SIGINT_BIT


def test_reap_kills_children_and_grandchildren(real_procs):
    chain = real_procs.spawn_chain()

    assert real_procs.reap() == []
    assert is_gone(chain.child)
    assert is_gone(chain.grandchild)


def test_helper_processes_carry_the_run_marker(real_procs, test_run_id):
    chain = real_procs.spawn_chain(setsid=True)

    marked = {p.pid for p in marked_processes(test_run_id)}
    assert {chain.child.pid, chain.grandchild.pid} <= marked
    assert chain.grandchild.environ()[RUN_ENV_VAR] == test_run_id


def test_leak_guard_kills_and_reports_a_leaked_process(tmp_path, test_run_id):
    # Not tracked by anything: exactly what the guard is for.
    leaked = psutil.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    # Popen returns once the exec has begun, and for a moment after that the
    # new image's environment is not readable yet (empty): the guard, which
    # finds leaks by the mark in it, would not see this one then.
    wait_for(lambda: leaked.environ().get(RUN_ENV_VAR) == test_run_id, HANDSHAKE_TIMEOUT, "sleep's environment")

    message = reap_leaks(test_run_id, exclude={os.getpid()})

    assert message is not None
    assert f"pid={leaked.pid} " in message
    assert "sleep 60" in message
    assert is_gone(leaked)
    assert reap_leaks(test_run_id, exclude={os.getpid()}) is None


def test_leak_guard_spares_unmarked_processes(test_run_id):
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV_VAR}
    stranger = psutil.Popen(["sleep", "60"], env=env, stdin=subprocess.DEVNULL)
    try:
        assert reap_leaks(test_run_id, exclude={os.getpid()}) is None
        assert stranger.is_running()
    finally:
        stranger.kill()
        stranger.wait(timeout=5)
