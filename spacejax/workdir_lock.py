"""The workdir lock: one run at a time in a workdir (`hold(workdir)`, held for the whole run).

    workdir/LOCK   JSON: host, pid, since (UTC), command, token, lease_expires (epoch s), and what
                   tells this machine's processes apart (boot_id, pid_namespace, process_start)

How it is taken, and why so:
- local: `os.open(O_CREAT | O_EXCL)`, atomic on a local disk and on NFS v3 and later (an exclusive
  create the server decides). The lock is the file, not an flock on it: an flock dies with a
  SIGKILLed holder, but on NFS it is emulated by byte-range locks, or stays local to each client
  (`local_lock=flock`, FUSE mounts), so two hosts could both hold it without a word; and a lock
  file names its holder for the error. The price, a file left by a killed holder, is paid by the
  stale rule below. An flock only guards the changes of an existing lock file (`LocalLockFile`).
- gs://: a create-only object (`ifGenerationMatch=0`: the upload fails with 412 if the object
  exists), written with gcsfs's session (`spacejax.storage`).

When a lock is stale (`stale_reason`):
- its holder ran on this machine (same host name, boot and pid namespace, so a pid means the same
  process here): stale when that pid is gone, or is another process (another start time in
  /proc/<pid>/stat). The check is exact, so a crashed run's lock is taken over at once.
- anywhere else (another host sharing the directory over NFS; any other host on gs://): stale when
  its lease has ended. The holder renews the lease (LEASE_S) every RENEW_S from a thread, so a
  lease ends LEASE_S - RENEW_S to LEASE_S after its holder stopped. Hosts' clocks must agree to
  within LEASE_S - RENEW_S.
A stale lock is taken over with a warning naming it, by a compare-and-swap, so that of two takers
one wins: on gs:// the new lock is written on condition of the stale object's generation; locally
under the lock file's flock, on condition that the path still names the file judged, unchanged.
Renewals and the release are compare-and-swaps too: a lock that is no longer ours is left alone.

Released when the `hold` block ends (return, exception, Preempted), removed only if it is still
ours (same content locally, same generation on gs://). A process killed without unwinding
(SIGKILL, a SIGTERM nobody handles) leaves its lock behind, stale by the rules above.

Several processes (`jax.distributed`): process 0 takes the lock for the whole run and renews it;
the others learn from a broadcast whether it did, and all of them raise if not, before any writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from spacejax import storage

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
LEASE_S = 300.0  # how long a lock from another host stays valid without a renewal
RENEW_S = 60.0  # how often the holder renews it (well inside the lease: a slow renewal still lands)
TAKE_ATTEMPTS = 5  # rounds of create / judge / take over while other launches race for the lock
RECORD_KEYS = ("host", "pid", "since", "command", "token", "lease_expires")


class WorkdirLocked(FileExistsError):
    """Another run holds the workdir (or its lock cannot be read); the message says what to do."""


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def machine() -> dict:
    """What makes a pid mean one process: host name, boot (Linux boot_id), pid namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": namespace}


def process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or
    None where /proc does not tell (not Linux, or no such process)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name start at field 3


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def new_record(command: str, lease_s: float) -> dict:
    """This process's lock record, its lease ending `lease_s` from now."""
    now = time.time()
    return {**machine(), "pid": os.getpid(), "process_start": process_start(os.getpid()), "since": _utc(now),
            "command": command, "token": uuid.uuid4().hex, "lease_expires": now + lease_s}


def _same_machine(holder: dict) -> bool:
    """Whether the lock's pid names a process of this machine (and pid namespace)."""
    return all(holder.get(key) == value for key, value in machine().items())


def stale_reason(holder: dict, now: float) -> Optional[str]:
    """Why the lock `holder` (a record) no longer holds, or None while it holds (module doc)."""
    if _same_machine(holder):
        pid = holder["pid"]
        if not _pid_running(pid):
            return f"pid {pid} is not running"
        start = process_start(pid)
        if holder.get("process_start") is not None and start is not None and start != holder["process_start"]:
            return f"pid {pid} is now another process (started at tick {start}, not {holder['process_start']})"
        return None
    if now > holder["lease_expires"]:
        return f"its lease ended at {_utc(holder['lease_expires'])} without a renewal"
    return None


def describe(holder: dict) -> str:
    return f"`{holder['command']}` (host {holder['host']}, pid {holder['pid']}, since {holder['since']})"


def held_message(path: str, holder: dict) -> str:
    """The refusal of a second launch: who holds the workdir and what to do."""
    message = (f"{path}: this workdir is in use by {describe(holder)}; wait for that run to end or stop it, "
               "or choose another --workdir")
    if not _same_machine(holder):
        message += (f". If that run is dead, its lock is stale once its lease ends at {_utc(holder['lease_expires'])} "
                    f"(or delete {path} once sure that no run uses this workdir)")
    return message


def parse(path: str, content: bytes) -> dict:
    """A lock record from the bytes of `path`; WorkdirLocked (saying what to do) if unreadable."""
    try:
        holder = json.loads(content)
    except ValueError:
        holder = None
    if not isinstance(holder, dict):
        problem = "not a JSON object"
    elif any(key not in holder for key in RECORD_KEYS):
        problem = "missing " + ", ".join(key for key in RECORD_KEYS if key not in holder)
    elif not isinstance(holder["pid"], int) or not isinstance(holder["lease_expires"], (int, float)):
        problem = "pid or lease_expires is not a number"
    else:
        return holder
    raise WorkdirLocked(f"{path} is not a lock this spacejax reads ({problem}); if no run uses this workdir, "
                        "delete it and launch again")


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


class LocalLockFile:
    """workdir/LOCK on a local (or NFS) filesystem; a version is the file's whole content.

    Creating the lock is an exclusive create. Changing an existing one (take over, renew, remove)
    is a compare-and-swap under an flock of that file: every changer holds it while it checks
    that the path still names the file it locked, with the content it expects, and then replaces
    (one rename, so the lock never vanishes) or unlinks it. The flock is held for microseconds and
    freed by the kernel if its holder dies, so it never goes stale itself."""

    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes) -> Optional[bytes]:
        """Create the lock holding `data`; None if it exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)  # one small write: a reader sees an empty file at worst, for microseconds
            os.fsync(fd)
        finally:
            os.close(fd)
        return data

    def read(self) -> Optional[tuple[bytes, bytes]]:
        """(content, version) of the lock, None if there is none."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: bytes) -> Optional[bytes]:
        """Replace the lock by one holding `data` if it is still `version`; else None."""
        with self._holding(version) as unchanged:
            if unchanged:
                storage.write_atomic(storage.location(self.path), data)
                return data
        return None

    def remove(self, version: bytes) -> bool:
        """Delete the lock if it is still `version`; False (left as it is) otherwise."""
        with self._holding(version) as unchanged:
            if unchanged:
                os.unlink(self.path)
        return unchanged

    @contextlib.contextmanager
    def _holding(self, version: bytes) -> Iterator[bool]:
        """The lock file flock'd for the block (every changer of it takes this flock first); yields
        whether the path still names that file and it holds `version`."""
        try:
            file = open(self.path, "r+b")  # for writing: NFS emulates flock with write locks
        except FileNotFoundError:
            file = None
        if file is None:
            yield False
            return
        with file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
            try:
                same = os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
            except FileNotFoundError:  # removed before this flock was granted
                same = False
            yield same and file.read() == version


class ObjectLockFile:
    """workdir/LOCK on gs://; a version is the object's generation. Every write and delete is
    conditional (`ifGenerationMatch`), through the JSON API on gcsfs's session; a 412 from GCS
    arrives as FileExistsError (gcsfs.retry.validate_response)."""

    def __init__(self, path: str):
        self.path = path
        self.fs = storage.filesystem()
        self.bucket = storage.bucket_of(path)
        self.key = path[len(storage.GS) + len(self.bucket) + 1:]

    def _write(self, data: bytes, generation) -> Optional[str]:
        """Upload `data` if the object is at `generation` (0: absent); its new generation, or None."""
        try:
            written = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{{}}/o", self.bucket,
                                   uploadType="media", name=self.key, ifGenerationMatch=str(generation), data=data,
                                   headers={"Content-Type": "text/plain"}, json_out=True)
        except FileExistsError:
            return None
        finally:
            self.fs.invalidate_cache(self.path)  # gcsfs's listings do not see writes made here
        return str(written["generation"])

    def create(self, data: bytes) -> Optional[str]:
        return self._write(data, 0)

    def read(self) -> Optional[tuple[bytes, str]]:
        """(content, generation) from one download, so the two belong together."""
        try:
            headers, data = self.fs.call("GET", self.fs.url(self.path))
        except FileNotFoundError:
            return None
        return data, headers["x-goog-generation"]

    def replace(self, data: bytes, version: str) -> Optional[str]:
        return self._write(data, version)

    def remove(self, version: str) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):  # replaced, or gone
            return False
        finally:
            self.fs.invalidate_cache(self.path)
        return True


def lock_file(workdir) -> LocalLockFile | ObjectLockFile:
    path = os.fspath(storage.location(workdir) / LOCK_FILE)
    return ObjectLockFile(path) if storage.is_remote(path) else LocalLockFile(path)


@dataclasses.dataclass
class Lock:
    """A held workdir lock: `record` is what workdir/LOCK holds, `version` its content or
    generation. From its creation a thread renews the lease every `renew_s` until `release`."""

    file: LocalLockFile | ObjectLockFile
    record: dict
    version: object
    lease_s: float
    renew_s: float

    def __post_init__(self):
        self._released = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, name="workdir-lock-lease", daemon=True)
        self._renewer.start()

    def _renew_until_released(self) -> None:
        """Every renew_s: push the lease end forward, on condition that the lock is still ours."""
        while not self._released.wait(self.renew_s):
            record = {**self.record, "lease_expires": time.time() + self.lease_s}
            try:
                version = self.file.replace(_encode(record), self.version)
            except Exception as error:  # noqa: BLE001 - a network blip: the lease has room for the next tries
                log.warning("%s: could not renew the lease (%s); trying again in %.0f s", self.file.path, error,
                            self.renew_s)
                continue
            if version is None:
                log.error("%s: this run no longer holds its workdir lock (taken over or removed after its lease "
                          "ended); another run may be writing this workdir", self.file.path)
                return
            self.record, self.version = record, version

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours."""
        self._released.set()
        self._renewer.join()
        try:
            removed = self.file.remove(self.version)
        except Exception as error:  # noqa: BLE001 - the run's own outcome stands; the lock goes stale
            log.warning("%s: could not remove the lock (%s); it is stale once this process has exited (or, seen "
                        "from another host, once its lease ends)", self.file.path, error)
            return
        if not removed:
            log.warning("%s: not removed at the end of the run: it is no longer this run's lock", self.file.path)


def acquire(workdir, command: Optional[str] = None, lease_s: float = LEASE_S, renew_s: float = RENEW_S) -> Lock:
    """Take workdir/LOCK for this process (creating the workdir), taking over a stale one with a
    warning; WorkdirLocked naming the holder if it is held. `command` defaults to argv."""
    file = lock_file(workdir)
    record = new_record(shlex.join(sys.argv) if command is None else command, lease_s)
    data = _encode(record)
    try:
        for _ in range(TAKE_ATTEMPTS):
            version = file.create(data)
            if version is not None:
                return Lock(file, record, version, lease_s, renew_s)
            found = file.read()
            if found is None:  # released meanwhile
                continue
            holder = parse(file.path, found[0])
            if holder["token"] == record["token"]:  # our own write, its answer lost and the request retried
                return Lock(file, record, found[1], lease_s, renew_s)
            reason = stale_reason(holder, time.time())
            if reason is None:
                raise WorkdirLocked(held_message(file.path, holder))
            log.warning("%s: taking over the stale lock of %s: %s", file.path, describe(holder), reason)
            version = file.replace(data, found[1])
            if version is not None:
                return Lock(file, record, version, lease_s, renew_s)
    except WorkdirLocked:
        raise
    except OSError as error:
        raise storage.StorageError(f"{file.path}: the workdir lock cannot be taken ({error}); check that the "
                                   "workdir is writable") from None
    raise WorkdirLocked(f"{file.path}: other launches kept changing the lock while this one tried to take it; "
                        "launch again once only one run is starting")


def _agreed(taken: bool) -> bool:
    """Process 0's `taken`, on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return taken
    return bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))


@contextlib.contextmanager
def hold(workdir, command: Optional[str] = None, lease_s: float = LEASE_S,
         renew_s: float = RENEW_S) -> Iterator[Optional[Lock]]:
    """The workdir's lock for the block: taken by process 0 for all processes of the run (yields
    the Lock there, None on the others), released when the block ends. Every process raises
    process 0's WorkdirLocked (or StorageError) before the block if it could not take it."""
    lock, failure = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir, command, lease_s, renew_s)
        except Exception as error:  # noqa: BLE001 - raised below, after the others have heard
            failure = error
    try:
        if not _agreed(lock is not None):
            raise failure or WorkdirLocked(f"{os.fspath(workdir)}: process 0 could not take the workdir lock "
                                           "(its log says why); nothing was written")
        yield lock
    finally:
        if lock is not None:
            lock.release()
