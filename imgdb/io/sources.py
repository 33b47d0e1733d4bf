"""Where images come from: files, folders walked recursively, and http(s) URLs; and where the
bytes of an image already ingested can be had again, only while they are still that image."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from imgdb.errors import ImageReadError, ImgdbError
from imgdb.io.fetch import FetchLimits, fetch_url, is_url
from imgdb.io.reader import SUFFIXES, read_file, sha256_hex


def expand(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield files and URLs to ingest: folders are walked recursively (image suffixes only, sorted,
    hidden entries skipped); files and URLs named explicitly are yielded as given, even missing
    ones, so that the reader reports them as failures instead of their silently disappearing."""
    for item in paths:
        text = str(item)
        if is_url(text):
            yield text
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if child.suffix.lower() in SUFFIXES and child.is_file():
                    yield absolute(child)
        else:
            yield absolute(path)


def absolute(path: str | Path) -> str:
    """The absolute, ``..``-free form of a path, symlinks kept: what imgdb stores as an image's uri
    and matches ``--metadata`` entries against."""
    return os.path.abspath(path)


def load(source: str | Path, limits: FetchLimits) -> bytes:
    """The bytes of a file or URL; failures raise an :class:`ImgdbError` naming the source."""
    text = str(source)
    if is_url(text):
        return fetch_url(text, limits)  # FetchError messages name the URL already
    try:
        return read_file(Path(text))
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
