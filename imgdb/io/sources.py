"""Where images come from: files, folders walked recursively, http(s) URLs, objects in S3 or
Google Cloud Storage, and list files of any of those; and where the bytes of an image already
ingested can be had again, only while they are still that image."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from imgdb.errors import ImageReadError, ImgdbError
from imgdb.io import objects
from imgdb.io.fetch import FetchLimits, fetch_url, is_url
from imgdb.io.reader import SUFFIXES, read_file, sha256_hex

#: A file named with this suffix is a list of what to ingest, one path or URL per line.
LIST_SUFFIX = ".txt"


def is_remote(text: str) -> bool:
    """True when ``text`` names an image elsewhere (an http(s) URL, an ``s3://`` or ``gs://``
    object), not a path on this machine."""
    return is_url(text) or objects.is_object_uri(text)


def expand(paths: Iterable[str | Path], *, lists: bool = True) -> Iterator[str]:
    """Yield files, URLs and objects to ingest: folders (and object prefixes) are walked recursively
    (image suffixes only, sorted, hidden entries skipped); a ``.txt`` file is a list, one path, URL
    or object per line (blank lines and ``#`` comments skipped, relative paths taken from the list's
    folder; a list names no further lists); what is named explicitly is yielded as given, even
    when missing, so that the reader reports it as a failure instead of its silently disappearing."""
    for item in paths:
        text = str(item)
        if is_url(text):
            yield text
            continue
        if objects.is_object_uri(text):
            yield from objects.walk(text)
            continue
        path = Path(text).expanduser()
        if lists and path.suffix.lower() == LIST_SUFFIX and path.is_file():
            yield from expand(_listed(path), lists=False)
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if child.suffix.lower() in SUFFIXES and child.is_file():
                    yield absolute(child)
        else:
            yield absolute(path)


def _listed(path: Path) -> Iterator[str]:
    """The entries of a list file, relative paths made absolute from its folder."""
    base = Path(absolute(path)).parent
    try:
        with path.open(encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield entry if is_remote(entry) else absolute(base / Path(entry).expanduser())
    except OSError as exc:
        raise ImgdbError(f"cannot read the list {path}: {exc.strerror or exc}") from None


def absolute(path: str | Path) -> str:
    """The absolute, ``..``-free form of a path, symlinks kept: what imgdb stores as an image's uri
    and matches ``--metadata`` entries against."""
    return os.path.abspath(path)


def load(source: str | Path, limits: FetchLimits, *, inside: str | None = None) -> bytes:
    """The bytes of a file, URL or object; failures raise an :class:`ImgdbError` naming the source.
    ``inside``: a file must lie in that folder (checked on the file opened)."""
    text = str(source)
    if is_url(text):
        return fetch_url(text, limits)  # FetchError messages name the URL already
    try:
        return objects.read(text) if objects.is_object_uri(text) else read_file(Path(text), inside=inside)
    except ImgdbError as exc:
        raise ImageReadError(f"{text}: {exc}") from None


def original_path(uri: str) -> Path | None:
    """The local file an image was ingested from, if it is still a readable file (URLs have none)."""
    if "://" in uri:
        return None
    path = Path(uri)
    return path if path.is_file() and os.access(path, os.R_OK) else None


def original(uri: str, sha256: str, stored: Callable[[], bytes | None] = lambda: None) -> bytes:
    """The bytes of the image that was ingested: from its file while the file still hashes to
    ``sha256`` (a file replaced since, by another picture or a symlink to ``/etc/shadow``, is not
    it), else from ``stored()`` (an attached table's bytea) under the same check; otherwise
    :class:`ImageReadError` says why there is none. URLs are not fetched here."""
    path = original_path(uri)
    reason = "its original is not available"
    if path is not None:
        try:
            data = read_file(path)
        except ImgdbError as exc:
            data, reason = None, f"its original cannot be read ({exc})"
        if data is not None:
            if sha256_hex(data) == sha256:
                return data
            reason = "the file at its ingested path has changed since it was ingested"
    data = stored()
    if data is not None and sha256_hex(data) == sha256:
        return data
    raise ImageReadError(reason)
