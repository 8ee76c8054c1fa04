"""The workdir lock (spacejax.workdir_lock): a second launch is refused while a run holds its
workdir, a dead holder's lock is taken over, a lease from another host holds until it ends, and
of two takers of a stale lock one wins; on a local disk and on gs:// (the real GCS emulator, whose
ifGenerationMatch handling tests/gcs_emulator.py adds), with real processes."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from spacejax import storage, workdir_lock

HOLDER = """
import sys
from spacejax import workdir_lock
with workdir_lock.hold(sys.argv[1], command="first run"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""

SECOND = """
import sys
from spacejax import workdir_lock
try:
    with workdir_lock.hold(sys.argv[1], command="second run"):
        print("the second run took the lock")
except workdir_lock.WorkdirLocked as error:
    print(error)
    sys.exit(3)
"""

MULTI_PROCESS = """
import os, sys
from spacejax import sharding, workdir_lock
sharding.initialize(sys.argv[1], 2, int(sys.argv[2]))
with workdir_lock.hold(sys.argv[3], command="two processes") as lock:
    print("held by me" if lock is not None and lock.record["pid"] == os.getpid() else f"lock {lock}", flush=True)
try:
    with workdir_lock.hold(sys.argv[4], command="two processes"):
        print("entered a locked workdir", flush=True)
except workdir_lock.WorkdirLocked as error:
    print("refused:", error, flush=True)
"""


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
    """A workdir that does not exist yet: a local folder, or a gs:// URL on the emulator."""
    if request.param == "gs":
        return request.getfixturevalue("gcs")("run")
    return str(tmp_path / "run")


def lock_path(workdir) -> str:
    return os.fspath(storage.location(workdir) / workdir_lock.LOCK_FILE)


def read_lock(workdir):
    found = workdir_lock.lock_file(workdir).read()
    return None if found is None else json.loads(found[0])


def write_lock(workdir, **fields) -> dict:
    """Put a lock record (this process's, with `fields` replaced) in place, as a run would have left it."""
    record = {**workdir_lock.new_record("an earlier run", workdir_lock.LEASE_S), **fields}
    path = storage.location(lock_path(workdir))
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, json.dumps(record))
    return record


def from_another_host(lease_s: float) -> dict:
    return {"host": "other-host", "pid": 4242, "lease_expires": time.time() + lease_s}


def start_holder(workdir) -> subprocess.Popen:
    """A process holding the workdir's lock until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    assert line == "held\n", holder.communicate()[1][-3000:]
    return holder


def test_a_second_launch_is_refused_while_the_first_runs_and_a_killed_runs_lock_is_taken_over(workdir, caplog):
    first = start_holder(workdir)
    second = subprocess.run([sys.executable, "-c", SECOND, workdir], capture_output=True, text=True, timeout=120)
    assert second.returncode == 3, second.stdout + second.stderr[-3000:]
    assert f"{lock_path(workdir)}: this workdir is in use by `first run` (host {socket.gethostname()}, " \
           f"pid {first.pid}, since " in second.stdout
    assert "choose another --workdir" in second.stdout
    assert read_lock(workdir)["pid"] == first.pid

    first.send_signal(signal.SIGKILL)  # no unwinding: the lock stays behind
    first.communicate()
    assert read_lock(workdir)["pid"] == first.pid
    with caplog.at_level(logging.WARNING, logger="spacejax.workdir_lock"):
        with workdir_lock.hold(workdir, command="relaunch") as lock:
            assert read_lock(workdir) == lock.record and lock.record["pid"] == os.getpid()
    assert "taking over the stale lock of `first run`" in caplog.text
    assert f"pid {first.pid} is not running" in caplog.text
    assert read_lock(workdir) is None


def test_a_finished_run_releases_the_lock_for_the_next_launch(workdir):
    first = start_holder(workdir)
    first.communicate(input="", timeout=60)  # the block ends normally
    assert first.returncode == 0 and read_lock(workdir) is None
    with workdir_lock.hold(workdir) as lock:
        assert read_lock(workdir)["token"] == lock.record["token"]


def test_a_live_pid_is_held_unless_it_is_another_process_than_the_one_that_locked(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    start = workdir_lock.process_start(os.getpid())
    write_lock(workdir, command="this very process")  # this pid, this start time: a live holder
    with pytest.raises(workdir_lock.WorkdirLocked, match=r"in use by `this very process` \(host .*, pid "
                                                            f"{os.getpid()}, since "):
        workdir_lock.acquire(workdir)

    write_lock(workdir, command="a process long gone", process_start=start - 1)  # the pid was reused since
    with caplog.at_level(logging.WARNING, logger="spacejax.workdir_lock"):
        with workdir_lock.hold(workdir) as lock:
            assert read_lock(workdir)["token"] == lock.record["token"]
    assert f"pid {os.getpid()} is now another process (started at tick {start}, not {start - 1})" in caplog.text


def test_a_lock_from_another_host_holds_until_its_lease_ends(workdir, caplog):
    stale_at = write_lock(workdir, command="a run elsewhere", **from_another_host(lease_s=1.5))["lease_expires"]
    with pytest.raises(workdir_lock.WorkdirLocked) as refused:
        workdir_lock.acquire(workdir)
    assert "in use by `a run elsewhere` (host other-host, pid 4242, since " in str(refused.value)
    assert f"its lock is stale once its lease ends at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(stale_at))}" \
        in str(refused.value)

    time.sleep(max(0.0, stale_at - time.time()) + 0.1)
    with caplog.at_level(logging.WARNING, logger="spacejax.workdir_lock"):
        with workdir_lock.hold(workdir) as lock:
            assert read_lock(workdir)["token"] == lock.record["token"]
    assert "taking over the stale lock of `a run elsewhere` (host other-host, pid 4242" in caplog.text
    assert "its lease ended at" in caplog.text


def test_the_holder_renews_its_lease_so_another_host_keeps_out(workdir, monkeypatch):
    with workdir_lock.hold(workdir, lease_s=1.0, renew_s=0.1) as lock:
        first_lease = read_lock(workdir)["lease_expires"]
        time.sleep(1.3)  # past the first lease: only renewals keep the lock
        assert read_lock(workdir)["lease_expires"] > first_lease + 0.5
        elsewhere = {"host": "other-host", "boot_id": "b", "pid_namespace": "n"}
        monkeypatch.setattr(workdir_lock, "machine", lambda: elsewhere)
        with pytest.raises(workdir_lock.WorkdirLocked, match="is stale once its lease ends"):
            workdir_lock.acquire(workdir)  # judged by its lease, as from another host
        assert read_lock(workdir)["token"] == lock.record["token"]


def test_the_lock_is_released_on_an_exception_and_removed_only_if_still_ours(workdir, caplog):
    with pytest.raises(RuntimeError, match="the run failed"):
        with workdir_lock.hold(workdir):
            assert read_lock(workdir) is not None
            raise RuntimeError("the run failed")
    assert read_lock(workdir) is None

    with caplog.at_level(logging.WARNING, logger="spacejax.workdir_lock"):
        with workdir_lock.hold(workdir):
            replaced = write_lock(workdir, command="someone else", **from_another_host(lease_s=60))
    assert read_lock(workdir) == replaced  # not ours any more: left in place
    assert "not removed at the end of the run: it is no longer this run's lock" in caplog.text


def test_of_two_takers_of_a_stale_lock_only_one_wins(workdir):
    write_lock(workdir, **from_another_host(lease_s=-1))
    file = workdir_lock.lock_file(workdir)
    _, stale = file.read()
    ours, theirs = b'{"taker": 1}', b'{"taker": 2}'
    assert file.replace(ours, stale) is not None
    assert file.replace(theirs, stale) is None  # judged the same stale lock: too late
    assert file.read()[0] == ours

    write_lock(workdir, **from_another_host(lease_s=-1))  # now all at once, through `acquire`
    start, outcomes = threading.Barrier(4), []

    def take():
        start.wait()
        try:
            outcomes.append(workdir_lock.acquire(workdir))
        except workdir_lock.WorkdirLocked as error:
            outcomes.append(error)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [outcome for outcome in outcomes if isinstance(outcome, workdir_lock.Lock)]
    assert len(won) == 1 and len(outcomes) == 4, outcomes
    assert read_lock(workdir)["token"] == won[0].record["token"]
    won[0].release()
    assert read_lock(workdir) is None


@pytest.mark.parametrize("content, problem", [
    ("", "not a JSON object"), ('{"host": "h", "pid": 1}', "missing since, command, token, lease_expires")])
def test_an_unreadable_lock_is_refused_saying_what_to_do(tmp_path, content, problem):
    (tmp_path / "LOCK").write_text(content)
    with pytest.raises(workdir_lock.WorkdirLocked) as refused:
        workdir_lock.acquire(tmp_path)
    assert str(refused.value) == (f"{tmp_path / 'LOCK'} is not a lock this spacejax reads ({problem}); if no run "
                                  "uses this workdir, delete it and launch again")
    assert (tmp_path / "LOCK").read_text() == content


def test_the_processes_of_a_multi_process_run_share_process_0s_lock(tmp_path):
    free, locked = str(tmp_path / "free"), str(tmp_path / "locked")
    write_lock(locked, command="a run elsewhere", **from_another_host(lease_s=600))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    processes = [subprocess.Popen([sys.executable, "-c", MULTI_PROCESS, f"127.0.0.1:{port}", str(i), free, locked],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for i in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert "held by me" in outputs[0] and "lock None" in outputs[1]
    assert not os.path.exists(os.path.join(free, "LOCK"))
    assert "refused: " + lock_path(locked) + ": this workdir is in use by `a run elsewhere`" in outputs[0]
    assert f"refused: {locked}: process 0 could not take the workdir lock" in outputs[1]
    assert "entered a locked workdir" not in "".join(outputs)
