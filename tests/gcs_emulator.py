"""gcp-storage-emulator, with the object-generation headers that real GCS sends on media downloads.

Run it exactly like the `gcp-storage-emulator` command:  python gcs_emulator.py start --in-memory ...

Why: real GCS answers every object download (GET ...?alt=media, full or ranged) with
`x-goog-generation` and `x-goog-metageneration` headers. tensorstore's gcs kvstore takes an
object's generation from `x-goog-generation` on such reads (absent -> 0). The emulator omits the
headers, so tensorstore records generation 0 for any object it *downloads*; OCDBT (Orbax's
default format) then makes a conditional write of manifest.ocdbt with ifGenerationMatch=<that
generation>, and tensorstore refuses generation 0 locally with "Malformed StorageGeneration"
(tensorstore/kvstore/gcs/validate.cc IsValidStorageGeneration; gcs_key_value_store.cc Write/Read).
Whether OCDBT re-downloads the manifest during a save depends on timing, hence the intermittency.

The patch wraps the emulator's download handler (the emulator serves one request at a time, so
the metadata read after the handler describes the bytes it just served) and touches nothing else.
"""

import sys

from gcp_storage_emulator import server
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


# The route table holds the handler functions themselves, so replace them there.
for _regex, _methods in server.HANDLERS:
    for _method, _handler in list(_methods.items()):
        if _handler is _download:
            _methods[_method] = download_with_generation
objects.download = download_with_generation

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main())
