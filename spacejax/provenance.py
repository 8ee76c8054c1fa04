"""What a run ran on: `collect()` -> a flat dict, written at every launch as
workdir/provenance/<UTC time>-<pid>.json and handed to the trackers (the wandb config,
TensorBoard text)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import jax
import jaxlib

import spacejax

PACKAGE_DIR = Path(spacejax.__file__).resolve().parent
LIBTPU_PACKAGES = ("libtpu", "libtpu-nightly")


def collect() -> dict:
    """The spacejax version and git commit (None outside a git checkout of spacejax), the jax,
    jaxlib and libtpu (None when absent) versions, the python version, the device topology and
    the command line. Call it after jax.distributed.initialize: it asks jax for the devices."""
    commit, dirty = git_state()
    devices = jax.devices()
    return {
        "spacejax": spacejax.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "libtpu": libtpu_version(),
        "python": platform.python_version(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "argv": list(sys.argv),
    }


def libtpu_version() -> Optional[str]:
    for name in LIBTPU_PACKAGES:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(HEAD's commit, whether tracked files differ from it) of the checkout spacejax is imported
    from, or (None, None): no git, or this spacejax is not the checkout's own (an installed copy
    inside some other repository)."""
    try:
        top, commit = _git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() / "spacejax" != PACKAGE_DIR:
            return None, None
        return commit, bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None, None


def _git(*args: str) -> str:
    """A read-only git command in the package's directory; GIT_OPTIONAL_LOCKS=0 keeps `git status`
    from refreshing the index, so it never takes the lock a concurrent commit needs."""
    environment = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(["git", *args], cwd=PACKAGE_DIR, env=environment, capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
