"""Embedded server lifecycle: one server per data folder, shared by processes, stopped cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT

from mlmd_lab.db.server import EmbeddedServer

CLIENT = """
import sys, time, json
import mlmd_lab
db = mlmd_lab.connect(data_dir=sys.argv[1], database="shared")
db.mongo.hits.insert_one({"pid": __import__("os").getpid()})
print(json.dumps({"port": db.server.ensure_running(register=False).port}), flush=True)
time.sleep(float(sys.argv[2]))
"""


def run_clients(data_dir, n, hold):
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(data_dir), str(hold)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return procs


@pytest.mark.slow
def test_concurrent_processes_share_one_server_which_stops_after_the_last(tmp_path):
    procs = run_clients(tmp_path, 4, hold=1.0)
    ports = [json.loads(p.stdout.readline())["port"] for p in procs]
    assert len(set(ports)) == 1, f"several servers started: {ports}"
    server = EmbeddedServer(tmp_path)
    info = server.status()
    assert info is not None and info.port == ports[0]
    assert 1 <= len(server.clients()) <= 4
    for p in procs:
        assert p.wait(60) == 0
    # the last client to exit stopped the server
    deadline = time.time() + 30
    while psutil.pid_exists(info.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert server.status() is None
    # data persisted: a new server on the same folder sees all four writes
    import mlmd_lab

    db = mlmd_lab.connect(data_dir=tmp_path, database="shared")
    try:
        assert db.mongo.hits.count_documents({}) == 4
    finally:
        db.close()
        db.server.release()


@pytest.mark.slow
def test_killed_client_does_not_keep_server_alive(tmp_path):
    victim = run_clients(tmp_path, 1, hold=60)[0]
    json.loads(victim.stdout.readline())
    server = EmbeddedServer(tmp_path)
    info = server.status()
    victim.kill()
    victim.wait()
    assert server.clients() == []  # dead lease pruned
    survivor = run_clients(tmp_path, 1, hold=0.1)[0]
    assert json.loads(survivor.stdout.readline())["port"] == info.port  # reused
    assert survivor.wait(60) == 0
    deadline = time.time() + 30
    while server.status() is not None and time.time() < deadline:
        time.sleep(0.1)
    assert server.status() is None


def test_pin_and_stop(tmp_path):
    server = EmbeddedServer(tmp_path)
    info = server.pin()
    try:
        assert server.status() == info
        again = EmbeddedServer(tmp_path).ensure_running(register=False)
        assert again == info  # reused, not restarted
    finally:
        assert server.stop() is True
    assert server.status() is None and not psutil.pid_exists(info.pid) or \
        psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert server.stop() is False


def _signal_other_thread(pid: int, signum: int) -> int:
    """Send ``signum`` to one thread of process ``pid`` other than its main thread (Linux tgkill), as the kernel
    may when it picks which thread of a process gets a process-wide signal. Returns that thread's id. Threads
    come and go (a connection's handler ends with it): the oldest that still exists gets the signal."""
    import ctypes
    import errno
    import platform

    number = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    if number is None:
        pytest.skip(f"tgkill's system call number on {platform.machine()} is not listed here")
    libc = ctypes.CDLL(None, use_errno=True)
    others = sorted(t.id for t in psutil.Process(pid).threads() if t.id != pid)
    assert others, "the server runs a single thread: this test needs another one to aim at"
    for tid in others:
        if libc.syscall(number, pid, tid, signum) == 0:
            return tid
        if ctypes.get_errno() != errno.ESRCH:  # anything but "that thread has ended" is a failure of the test
            raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}) failed")
    raise AssertionError(f"every one of the server's other threads {others} ended before the signal")


def test_server_stops_when_sigterm_reaches_one_of_its_other_threads(tmp_path):
    """A process-wide SIGTERM may land in any thread; Python runs the handler in the main thread only, so the
    server's main thread must wake by itself (SecantusDB's own wait never did: the server ran on until killed)."""
    server = EmbeddedServer(tmp_path)
    info = server.pin()
    proc = psutil.Process(info.pid)
    try:
        _signal_other_thread(info.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except psutil.TimeoutExpired:
            pytest.fail("the server did not stop within 15 s of a SIGTERM delivered to one of its other threads")
    finally:
        server.stop()
    assert server.status() is None


def test_stale_state_file_is_replaced(tmp_path):
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "server.json").write_text(json.dumps({"pid": 999999, "host": os.uname().nodename,
                                                       "port": 1, "started": 0.0}))
    server = EmbeddedServer(tmp_path)
    assert server.status() is None
    info = server.pin()
    try:
        assert info.pid != 999999
    finally:
        server.stop()


def test_unwritable_data_dir_message(tmp_path):
    from mlmd_lab.errors import DatabaseError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatabaseError, match="MLMD_DATA_DIR"):
        EmbeddedServer(blocker / "sub").ensure_running()
