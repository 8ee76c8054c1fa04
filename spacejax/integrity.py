"""Checksum manifests: every checkpoint spacejax writes lists its files, verified before it is read.

    CKPT_DIR/manifest.json   {"algorithm": "crc32" | "crc32c",
                              "files": {"params/d/9f0e...": {"size": 1234, "checksum": "1c291ca3"}, ...}}

Paths are relative to the checkpoint's directory, with "/". A step checkpoint (`checkpoint.
TrainCheckpoints`) gets its manifest inside Orbax's commit, a params checkpoint (`final/`,
`spacejax convert`) before its model_config.json, a Hugging Face export (`hf.save`, `hf.
save_adapter`) before its config.json: the completion marker of each is written after its manifest.
`verify` checks every listed file (missing, another size, another checksum: an IntegrityError
naming the file); files the manifest does not list (markers written after it) are not checked.

Which checksum, and what it costs (a 7B step checkpoint with optimizer state is ~80 GB):
- gs://: CRC-32C as GCS keeps it in every object's metadata (computed and checked by GCS at upload,
  composite objects included, which lack md5Hash; the GCS emulator of the tests computes it too).
  One listing of the prefix returns it with the sizes, so writing or verifying a manifest of any
  size reads no object back. It catches an object replaced, truncated or deleted after the save;
  the bytes at rest are GCS's own to guard.
- local files: CRC-32 (zlib, no extra dependency) over the file's bytes read in 8 MiB chunks:
  1.7 GB/s from the page cache on one core of the CI machine (3 GB/s in memory; zlib releases the
  GIL), so an 80 GB checkpoint costs ~45 s (or the disk's read time) per save, in Orbax's
  background commit thread, and per restore.
- a file assembled locally and bound for gs:// (an export's staging folder): CRC-32C of its bytes
  (google-crc32c, installed with gcsfs), equal to what GCS will hold. A manifest copied between a
  disk and a bucket still verifies: a checksum the storage does not keep is computed from the bytes.
A CRC detects torn writes, truncation and garbage, not a deliberate forgery.

Multi-file exports are assembled in a staging folder and `publish`ed: the folder is the same one
for the same target, so an export killed half-way is cleaned by the next one, and the previous
export's files (as its manifest lists them) are removed before the new ones move in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Optional

from spacejax import storage

MANIFEST = "manifest.json"
CRC32, CRC32C = "crc32", "crc32c"
CHUNK_BYTES = 8 << 20


class IntegrityError(ValueError):
    """A checkpoint's files do not match its manifest; the message names the file."""


def algorithm_for(directory) -> str:
    """The checksum a manifest of `directory` records: the one its storage keeps or computes cheapest."""
    return CRC32C if storage.is_remote(directory) else CRC32


def digest(chunks: Iterable[bytes], algorithm: str) -> str:
    """The checksum of the concatenated `chunks`, as 8 hex digits (big-endian, as GCS stores CRC-32C)."""
    if algorithm == CRC32:
        value = 0
        for chunk in chunks:
            value = zlib.crc32(chunk, value)
        return f"{value:08x}"
    if algorithm == CRC32C:
        try:
            import google_crc32c
        except ImportError:
            raise storage.StorageError('verifying a crc32c manifest needs google-crc32c: pip install "spacejax[gcs]"') \
                from None
        checksum = google_crc32c.Checksum()
        for chunk in chunks:
            checksum.update(chunk)
        return checksum.digest().hex()
    raise IntegrityError(f"unknown checksum algorithm {algorithm!r}")


def entry(data: bytes, algorithm: str) -> dict:
    """The manifest entry of a file that will hold `data` (one written after its manifest)."""
    return {"size": len(data), "checksum": digest([data], algorithm)}


def describe(directory, algorithm: Optional[str] = None, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"size", "checksum"}} of every file under `directory` but the manifest and
    those named in `exclude` (relative paths); `algorithm`: default `algorithm_for(directory)`."""
    directory = storage.location(directory)
    algorithm = algorithm or algorithm_for(directory)
    listing = _listing(directory)
    return {name: {"size": size, "checksum": _checksum(directory, name, stored, algorithm)}
            for name, (size, stored) in sorted(listing.items()) if name != MANIFEST and name not in exclude}


def write(directory, files: dict[str, dict], algorithm: Optional[str] = None) -> None:
    """Write `directory`/manifest.json listing `files` (from `describe` / `entry`), atomically."""
    directory = storage.location(directory)
    manifest = {"algorithm": algorithm or algorithm_for(directory), "files": files}
    storage.write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def read(directory) -> Optional[dict]:
    """The manifest of `directory` ({"algorithm", "files"}), or None if it has none."""
    path = storage.location(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files, algorithm = manifest["files"], manifest["algorithm"]
        for name, listed in files.items():
            _check_name(name)
            if not isinstance(listed["size"], int) or not isinstance(listed["checksum"], str):
                raise TypeError(f"{name}: an entry is {{'size': int, 'checksum': str}}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise IntegrityError(f"{path} is not a manifest spacejax reads ({type(error).__name__}: {error}): the "
                             "checkpoint was damaged") from None
    return {"algorithm": algorithm, "files": files}


def verify(directory, required: bool = True) -> bool:
    """Check every file the manifest of `directory` lists: present, of its size, of its checksum.
    Raises IntegrityError naming the first file that is not; without a manifest, raises if
    `required`, else returns False. Sizes are all checked before any byte is read."""
    directory = storage.location(directory)
    manifest = read(directory)
    if manifest is None:
        if required:
            raise IntegrityError(f"{directory / MANIFEST} is missing: the files of {directory} cannot be verified")
        return False
    listing = _listing(directory)
    where = f"(listed in {directory / MANIFEST})"
    for name, listed in sorted(manifest["files"].items()):
        if name not in listing:
            raise IntegrityError(f"{directory / name} is missing {where}: the checkpoint is incomplete or damaged")
        if listing[name][0] != listed["size"]:
            raise IntegrityError(f"{directory / name} has {listing[name][0]} bytes, not the {listed['size']} "
                                 f"{where}: the file was truncated or overwritten")
    for name, listed in sorted(manifest["files"].items()):
        actual = _checksum(directory, name, listing[name][1], manifest["algorithm"])
        if actual != listed["checksum"]:
            raise IntegrityError(f"{directory / name} has {manifest['algorithm']} {actual}, not the "
                                 f"{listed['checksum']} {where}: the file was overwritten or corrupted")
    return True


def _listing(directory) -> dict[str, tuple[int, Optional[str]]]:
    """{relative path: (size, the CRC-32C the storage keeps or None)} of every file under `directory`:
    one listing on gs://, a walk locally."""
    if storage.is_remote(directory):
        root = os.fspath(directory).rstrip("/")
        filesystem = storage.filesystem()
        found = filesystem.find(root, detail=True)  # always listed afresh
        filesystem.invalidate_cache()  # gcsfs caches what find listed: drop it before it can go stale
        prefix = root[len(storage.GS):] + "/"
        return {name[len(prefix):]: (int(info["size"]), _gcs_crc32c(info)) for name, info in found.items()
                if info.get("type") == "file" and name.startswith(prefix)}
    root = os.fspath(directory)
    listing = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            listing[os.path.relpath(path, root).replace(os.sep, "/")] = (os.path.getsize(path), None)
    return listing


def _gcs_crc32c(info: dict) -> Optional[str]:
    """An object's CRC-32C from its metadata (base64 of 4 big-endian bytes) as 8 hex digits."""
    value = info.get("crc32c")
    return base64.b64decode(value).hex() if value else None


def _checksum(directory, name: str, stored: Optional[str], algorithm: str) -> str:
    """The checksum of `directory`/`name`: the storage's own when it keeps this algorithm's, else
    computed from the file's bytes."""
    if stored is not None and algorithm == CRC32C:
        return stored
    with (storage.location(directory) / name).open("rb") as file:
        return digest(iter(lambda: file.read(CHUNK_BYTES), b""), algorithm)


def _check_name(name: str) -> None:
    """A manifest names files inside its directory only."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{name!r} is not a path inside the checkpoint")


# ----------------------------------------------------------------------------------- exports


def staging_folder(out_dir) -> Path:
    """An empty local folder to assemble an export bound for `out_dir` in: the same folder for the
    same target (beside it locally, so files move in by a rename; in the system's temporary folder
    for gs://), emptied first, so an export killed half-way leaves nothing behind the next one."""
    out_dir = storage.location(out_dir)
    if storage.is_remote(out_dir):
        tag = hashlib.sha256(os.fspath(out_dir).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"spacejax-staging-{tag}"
    else:
        folder = Path(os.fspath(out_dir.parent)) / f".{out_dir.name}.staging"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def publish(staging: Path, out_dir, marker: str, stale: tuple[str, ...] = ()) -> None:
    """Move the files assembled in `staging` into `out_dir` (local or gs://) so that `out_dir`
    holds a complete export exactly when `marker` (one of the files) is there: the marker goes
    first, then the previous export's files (those its manifest lists, and `stale`: names an
    export without a manifest may have left), then the new manifest, the files, the marker last.
    A crash before the end leaves no marker, and a manifest listing every file of the new export
    present (the next export removes them: no stale shard of another layout survives)."""
    out_dir = storage.location(out_dir)
    files = describe(staging, algorithm_for(out_dir))
    if marker not in files:
        raise FileNotFoundError(f"{staging / marker}: the export's completion marker was not written")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / marker).unlink(missing_ok=True)
    for name in sorted({*stale, *_listed(out_dir)}):
        (out_dir / name).unlink(missing_ok=True)
    write(out_dir, files)
    for name in sorted(files, key=lambda name: name == marker):
        target = out_dir / name
        if not storage.is_remote(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        storage.put_file(staging / name, target)


def _listed(directory) -> list[str]:
    """The files the manifest of `directory` lists; none if it has no manifest or a damaged one."""
    try:
        manifest = read(directory)
    except IntegrityError:
        return []
    return list(manifest["files"]) if manifest else []
