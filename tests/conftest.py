"""Test setup, before jax is first imported: 8 simulated CPU devices, nothing downloaded, and a
persistent compilation cache shared by the test processes (the loop tests start subprocesses)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spacejax-tests-jax-cache"))
# Every program, however quick to compile (jax keeps only those over 1 s by default): each test process, each
# subprocess too, otherwise compiles the same small programs again (~3 CPU s a tiny run).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# wandb (offline in the tests) keeps its files in a temporary folder and cannot reach a server.
for _name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    os.environ.setdefault(_name, os.path.join(tempfile.gettempdir(), "spacejax-tests-wandb"))
os.environ.setdefault("WANDB_BASE_URL", "http://127.0.0.1:9")
os.environ.setdefault("WANDB_SILENT", "true")
# No test may reach a metadata server: a stray credential lookup fails on a closed loopback port.
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

# after XLA_FLAGS: runs imports jax
from runs import TWO_PROCESSES, free_port, run_processes, train_arguments  # noqa: E402

GCS_BUCKET = "spacejax-test"


@pytest.fixture(scope="session")
def gcs():
    """A real GCS emulator (gcp-storage-emulator, in memory) on a free loopback port for the
    session, with STORAGE_EMULATOR_HOST set for this process and its children (spacejax.storage
    points gcsfs and tensorstore at it). Yields `new_url(name) -> gs://spacejax-test/<unique>/name`."""
    port = free_port()
    # gcs_emulator.py: the emulator plus the x-goog-generation download header real GCS sends
    # (without it tensorstore's OCDBT saves fail at random with "Malformed StorageGeneration").
    command = [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start",
               "--in-memory", "--host", "127.0.0.1", "--port", str(port), "--default-bucket", GCS_BUCKET]
    emulator = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert emulator.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.1)
    host = f"http://127.0.0.1:{port}"
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(STORAGE_EMULATOR_HOST=host, TENSORSTORE_GCS_HTTP_URL=host, GOOGLE_AUTH_TOKEN_FOR_TESTING="test")
    try:
        yield lambda name="": f"gs://{GCS_BUCKET}/{uuid.uuid4().hex[:8]}/{name}".rstrip("/")
    finally:
        emulator.terminate()
        emulator.wait()
        for name, value in before.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
    """runs.TWO_PROCESSES trained by two processes of 4 devices each, uninterrupted (once a session:
    test_sharding compares it with one process, test_faults resumes a stopped pair to it)."""
    workdir = tmp_path_factory.mktemp("two_processes") / "run"
    run_processes(train_arguments(workdir, TWO_PROCESSES))
    return workdir
