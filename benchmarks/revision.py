"""spacejax as it was at an earlier git revision, importable beside this tree for an A/B in one
process: the revision's package is extracted with `git archive` and imported as a second module
tree. Its functions keep their own module globals, so the two trees run side by side."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spacejax(name: str) -> bool:
    return name == "spacejax" or name.startswith("spacejax.")


def module_at(rev: str, name: str):
    """Module `name` (e.g. "spacejax.sampler") of the spacejax package at git revision `rev`."""
    directory = tempfile.mkdtemp(prefix=f"spacejax_{rev}_")
    archive = subprocess.run(["git", "archive", rev, "spacejax"], cwd=ROOT, check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(directory, filter="data")
    current = {module: sys.modules.pop(module) for module in list(sys.modules) if _spacejax(module)}
    sys.path.insert(0, directory)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(directory)
        for module in [module for module in sys.modules if _spacejax(module)]:
            del sys.modules[module]
        sys.modules.update(current)
