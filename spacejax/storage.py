"""Where a run's files live: a local path or a gs:// URL, as one path type (`etils.epath.Path`).

`location(text)` is the one way in: a gs:// URL stays a URL (never through `pathlib`, which
would collapse `gs://b/x` into a local folder `gs:/b/x`); a local path becomes absolute. The
result has pathlib's methods (`/`, `exists`, `read_text`, `open`, `iterdir`, `rmtree`) on both.
Orbax takes it as it is and writes gs:// through tensorstore; every other file goes through
gcsfs (the `gcs` extra), using only what an object store has: no directory rename, no append.

What must stay true on an object store:
- one object write is atomic (a reader sees the old object or the whole new one), so
  `write_atomic` writes gs:// objects directly and stages local files beside their target;
- a multi-file save is complete when its small marker, written last, exists.

The emulator: with STORAGE_EMULATOR_HOST=http://HOST:PORT set, gcsfs talks to it anonymously, and
tensorstore (Orbax) is pointed at it too unless TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING say otherwise; so one variable moves a whole run onto an emulator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from typing import Iterator, Union

from etils import epath

GS = "gs://"
PathLike = Union[str, os.PathLike]


class StorageError(Exception):
    """A location that cannot be used; the message names it and says what to do."""


def is_remote(path: PathLike) -> bool:
    return os.fspath(path).startswith(GS)


def location(path: PathLike) -> epath.Path:
    """A local path (made absolute) or a gs://BUCKET/... URL, as an `epath.Path`."""
    text = os.fspath(path)
    if text.startswith(GS):
        bucket = text[len(GS):].split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{text}: a gs:// URL needs a bucket, as in gs://BUCKET/PATH")
        _use_emulator_if_set()
        return epath.Path(text.rstrip("/"))
    if "://" in text:
        raise StorageError(f"{text}: only local paths and gs:// URLs are supported")
    return epath.Path(os.path.abspath(text))


def bucket_of(path: PathLike) -> str:
    return os.fspath(path)[len(GS):].split("/", 1)[0]


def check_usable(path: PathLike) -> None:
    """Before anything is written to `path`: on gs://, credentials exist (unless an emulator is
    set) and the bucket exists. Raises StorageError naming the URL."""
    text = os.fspath(path)
    if not is_remote(text):
        return
    location(text)
    if importlib.util.find_spec("gcsfs") is None:
        raise StorageError(f'{text}: gs:// needs gcsfs: pip install "spacejax[gcs]"')
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError as error:
            raise StorageError(f"{text}: no Google Cloud credentials ({str(error).splitlines()[0]}); run "
                               "`gcloud auth application-default login`, or check the VM's service account") \
                from None
    try:
        exists = filesystem().exists(bucket_of(text))
    except OSError as error:
        raise StorageError(f"{text}: the bucket cannot be reached ({error})") from None
    if not exists:
        raise StorageError(f"{text}: bucket gs://{bucket_of(text)} does not exist (or these credentials cannot see "
                           "it); create it with `gcloud storage buckets create gs://BUCKET` or fix the URL")


def write_atomic(path: epath.Path, data: Union[str, bytes]) -> None:
    """Replace the file at `path` with `data` so that a reader (or a crash) never sees part of it."""
    if is_remote(path):
        with path.open("w" if isinstance(data, str) else "wb") as file:
            file.write(data)
        return
    with staged_writer(path) as staging:
        staging.write_text(data) if isinstance(data, str) else staging.write_bytes(data)


@contextlib.contextmanager
def staged_writer(path: epath.Path) -> Iterator[epath.Path]:
    """A local file to write whatever a library writes to a path (parquet, safetensors); on
    exit it replaces `path` atomically (`put_file`)."""
    folder = staging_dir(path)
    try:
        staging = epath.Path(folder) / path.name
        yield staging
        put_file(staging, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def put_file(local_file: epath.Path, path: epath.Path) -> None:
    """Move a finished local file to `path` in one step: a rename on the same disk, one object
    upload on gs:// (the local file is then deleted)."""
    if is_remote(path):
        filesystem().put_file(os.fspath(local_file), os.fspath(path))
        os.unlink(os.fspath(local_file))
    else:
        os.replace(os.fspath(local_file), os.fspath(path))


def staging_dir(path: epath.Path) -> str:
    """A new empty local directory in which to assemble files bound for `path`: beside it
    locally (so `put_file` is a rename), in the system's temporary folder for gs://."""
    return tempfile.mkdtemp(prefix=".staging-", dir=None if is_remote(path) else _made(path.parent))


def _made(folder: epath.Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return os.fspath(folder)


@contextlib.contextmanager
def local_copy(path: epath.Path, skip_suffixes: tuple[str, ...] = ()) -> Iterator[epath.Path]:
    """A local directory holding the files of the directory `path` (itself when it is local; a
    temporary download of gs://, less the files ending in `skip_suffixes`, removed on exit): for
    libraries that read only local files (safetensors, tokenizers, `datasets`)."""
    if not is_remote(path):
        yield path
        return
    gcs = filesystem()
    root = os.fspath(path).rstrip("/")
    remote = [name for name in gcs.find(root) if not name.endswith(skip_suffixes)]
    if not remote:
        raise FileNotFoundError(f"{root} holds no files")
    with tempfile.TemporaryDirectory(prefix="spacejax-") as folder:
        prefix = root[len(GS):] + "/"
        local = [os.path.join(folder, name[len(prefix):]) for name in remote]
        gcs.get([GS + name for name in remote], local)
        yield epath.Path(folder)


def move_tree(source: epath.Path, target: epath.Path, first: str = "") -> None:
    """Move the directory `source` to `target` (which must not exist). Locally a rename; on gs://
    a copy of every object and then deletes, `first` (a marker inside `source`) deleted before
    the rest, so that a crash half-way leaves `source` either whole or without its marker."""
    if not is_remote(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(os.fspath(source), os.fspath(target))
        return
    filesystem().copy(os.fspath(source).rstrip("/") + "/", os.fspath(target).rstrip("/") + "/", recursive=True)
    if first:
        (source / first).unlink(missing_ok=True)
    source.rmtree(missing_ok=True)


def filesystem():
    """The gcsfs filesystem that `epath` uses for gs://."""
    import fsspec

    _use_emulator_if_set()
    try:
        return fsspec.filesystem("gcs", finalize_on_close=True)
    except ImportError:
        raise StorageError('gs:// needs gcsfs: pip install "spacejax[gcs]"') from None


def _use_emulator_if_set() -> None:
    """Point gcsfs and tensorstore at STORAGE_EMULATOR_HOST when it is set (before either first
    talks to storage): anonymous gcsfs, and no probe of the Storage Control API that gcsfs uses to
    detect hierarchical buckets (an emulator does not serve it)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    import fsspec

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("token", "anon")
