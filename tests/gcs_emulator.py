"""gcp-storage-emulator, with two behaviours of real GCS it lacks: the object-generation headers on
media downloads, and the `ifGenerationMatch` precondition on writes and deletes.

Run it exactly like the `gcp-storage-emulator` command:  python gcs_emulator.py start --in-memory ...

Why: real GCS answers every object download (GET ...?alt=media, full or ranged) with
`x-goog-generation` and `x-goog-metageneration` headers. tensorstore's gcs kvstore takes an
object's generation from `x-goog-generation` on such reads (absent -> 0). The emulator omits the
headers, so tensorstore records generation 0 for any object it *downloads*; OCDBT (Orbax's
default format) then makes a conditional write of manifest.ocdbt with ifGenerationMatch=<that
generation>, and tensorstore refuses generation 0 locally with "Malformed StorageGeneration"
(tensorstore/kvstore/gcs/validate.cc IsValidStorageGeneration; gcs_key_value_store.cc Write/Read).
Whether OCDBT re-downloads the manifest during a save depends on timing, hence the intermittency.

The first patch wraps the emulator's download handler (the emulator serves one request at a time,
so the metadata read after the handler describes the bytes it just served) and changes nothing else.

Preconditions: real GCS refuses an upload (media, multipart, each request of a resumable one) or a
delete whose `ifGenerationMatch=G` is not the object's live generation (0: the object must not
exist) with 412 Precondition Failed; `spacejax.workdir_lock` relies on it (a create-only lock
object, a takeover conditional on the stale object's generation). The emulator ignores the
parameter and overwrites; the wrapper checks it before the emulator's handler runs. The check and
the write are one step because the emulator serves one request at a time (`http.server.HTTPServer`).
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status.value not in (200, 206):
        return
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # the object vanished: leave the emulator's answer as it is
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
    response["x-goog-stored-content-length"] = str(obj.get("size", ""))


def _live_generation(storage, bucket: str, name: str) -> int:
    """The object's generation, 0 when it does not exist (GCS's meaning of ifGenerationMatch=0)."""
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _upload_name(request, storage) -> str:
    """The object an upload request writes: `name` in the query (media, resumable start), the
    JSON part of a multipart body, or the resumable session the request continues."""
    if "upload_id" in request.query:
        return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data or {}
    return data.get("meta", data).get("name")


def _delete_name(request, storage) -> str:
    return request.params["object_id"]


def with_generation_precondition(handler, object_name):
    """`handler`, refused with 412 when the request's ifGenerationMatch is not the live generation."""

    def handle(request, response, storage, *args, **kwargs):
        expected = request.query.get("ifGenerationMatch")
        if expected is not None:
            request.data  # read the body first: the connection must not be left holding it
            try:
                name = object_name(request, storage)
            except NotFound:  # an unknown upload session: the handler answers 404
                return handler(request, response, storage, *args, **kwargs)
            live = _live_generation(storage, request.params["bucket_name"], name)
            if int(expected[0]) != live:
                message = f"ifGenerationMatch={expected[0]}: the live generation is {live}"
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": message,
                                         "errors": [{"domain": "global", "reason": "conditionNotMet",
                                                     "message": message}]}})
                return None
        return handler(request, response, storage, *args, **kwargs)

    return handle


# The route table holds the handler functions themselves, so replace them there (and in the module,
# which the router reads for uploads posted without the /upload prefix).
_REPLACED = {
    _download: download_with_generation,
    objects.insert: with_generation_precondition(objects.insert, _upload_name),
    objects.upload_partial: with_generation_precondition(objects.upload_partial, _upload_name),
    objects.delete: with_generation_precondition(objects.delete, _delete_name),
}
for _regex, _methods in server.HANDLERS:
    for _method, _handler in list(_methods.items()):
        _methods[_method] = _REPLACED.get(_handler, _handler)
for _name in ("download", "insert", "upload_partial", "delete"):
    setattr(objects, _name, _REPLACED[getattr(objects, _name)])

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main())
