"""Object storage (``s3://bucket/key``, ``gs://bucket/key``), where large collections are kept,
read through pyarrow's filesystem layer: the one Ray Data reads with, so an ingest on a cluster
reads objects as a local one does.

Credentials come from the environment of the process that reads (``AWS_ACCESS_KEY_ID`` and
friends, ``AWS_ENDPOINT_URL`` for an S3-compatible server, the instance's role, Google's
application credentials); imgdb never stores them, and refuses an object URI that carries any:
no user or password, and no query string, through which pyarrow would take an access key or an
``endpoint_override`` from the URI itself (a list file of URIs must not point the reader at
another server, the cloud's metadata endpoint for one).
"""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Iterator
from typing import Any

from imgdb.errors import ImageReadError, ImgdbError
from imgdb.io.reader import MAX_FILE_BYTES, SUFFIXES

SCHEMES = ("s3", "gs")


def is_object_uri(text: str) -> bool:
    """True when ``text`` names an object in S3 or Google Cloud Storage (``s3://``, ``gs://``)."""
    head = text[:5].lower()
    return head.startswith("s3://") or head.startswith("gs://")


def walk(uri: str) -> Iterator[str]:
    """The objects at ``uri``: the object itself, or every image under it taken as a folder (image
    suffixes only, sorted, hidden names skipped, as a local folder is walked). A URI that is not a
    prefix, or that cannot be listed (refused, its bucket unreachable) is yielded as given: its read
    reports why, as one failure among the others."""
    try:
        scheme, bucket, key = _split(uri)
        filesystem, fs = _filesystem(scheme, bucket)
        path = f"{bucket}/{key}".rstrip("/")
        found = (filesystem.get_file_info(fs.FileSelector(path, recursive=True))
                 if filesystem.get_file_info(path).type == fs.FileType.Directory else None)
    except (ImgdbError, OSError):
        found = None
    if found is None:
        yield uri
        return
    for entry in sorted(found, key=lambda entry: entry.path):
        relative = entry.path[len(path) + 1:]
        if (entry.type == fs.FileType.File and entry.extension and f".{entry.extension.lower()}" in SUFFIXES
                and not any(part.startswith(".") for part in relative.split("/"))):
            yield f"{scheme}://{entry.path}"


def read(uri: str) -> bytes:
    """An object's bytes, refused past the size a local file may have (:data:`MAX_FILE_BYTES`)."""
    scheme, bucket, key = _split(uri)
    filesystem, fs = _filesystem(scheme, bucket)
    try:
        info = filesystem.get_file_info(f"{bucket}/{key}")
        if info.type == fs.FileType.NotFound:
            raise ImageReadError("no such object")
        if info.type != fs.FileType.File:
            raise ImageReadError("not an object (a prefix)")
        if not info.size:
            raise ImageReadError("empty object")
        if info.size > MAX_FILE_BYTES:
            raise ImageReadError(f"object of {info.size} bytes is larger than {MAX_FILE_BYTES}")
        with filesystem.open_input_stream(f"{bucket}/{key}") as stream:
            return stream.read(MAX_FILE_BYTES)
    except OSError as exc:
        raise ImageReadError(_reason(exc)) from None


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of an object URI, refused where it carries credentials or options."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ImgdbError(f"not an object-storage URI ({', '.join(s + '://' for s in SCHEMES)})")
    if "@" in parts.netloc:
        raise ImgdbError(f"{scheme}:// URIs carry no credentials: imgdb takes them from the environment")
    if parts.query or parts.fragment:
        raise ImgdbError(f"{scheme}:// URIs take no options (?...): the endpoint and credentials come from the environment")
    if not parts.netloc:
        raise ImgdbError(f"{scheme}:// URI without a bucket")
    return scheme, parts.netloc, parts.path.lstrip("/")


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, bucket: str) -> tuple[Any, Any]:
    """The filesystem of one bucket (pyarrow finds an S3 bucket's region), and ``pyarrow.fs``."""
    try:
        import pyarrow.fs as fs
    except ImportError:
        raise ImgdbError(f"{scheme}:// needs pyarrow: pip install 'imgdb[ray]' (or pyarrow)") from None
    try:
        filesystem, _ = fs.FileSystem.from_uri(f"{scheme}://{bucket}")
    except (OSError, ValueError) as exc:
        raise ImgdbError(f"cannot reach {scheme}://{bucket}: {_reason(exc)}") from None
    return filesystem, fs


def _reason(exc: Exception) -> str:
    """pyarrow's message, first line, without the AWS SDK's boilerplate."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
