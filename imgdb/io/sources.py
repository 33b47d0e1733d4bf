"""Where images come from: files, folders walked recursively, and http(s) URLs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from imgdb.errors import ImageReadError, ImgdbError
from imgdb.io.fetch import FetchLimits, fetch_url, is_url
from imgdb.io.reader import SUFFIXES, read_file


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
