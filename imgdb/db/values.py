"""What PostgreSQL's ``text`` and ``jsonb`` can hold, checked before anything is sent.

PostgreSQL text is UTF-8 without NUL; jsonb adds JSON's own limits (no NaN or Infinity). Python
strings can hold both (a NUL from an EXIF tag, a lone surrogate from a file name whose bytes are
not UTF-8), and a JSON document can nest deeper than anything sensible to store. Sent as they
are, such values abort the whole statement, and with it every other image of the batch: so they
are checked item by item, here, with a reason a person can act on. (Text that is only
informative, an EXIF camera name, is cleaned where it is read: :mod:`imgdb.io.reader`.)
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from typing import Any

from imgdb.errors import ImgdbError

#: Deepest metadata nesting imgdb stores (objects and arrays inside one another).
MAX_DEPTH = 64
#: Deepest JSON document imgdb parses at all; deeper ones are refused whole, before Python's own
#: recursion limit (about 1,000) or the C stack would be.
MAX_PARSE_DEPTH = 10_000
_parse_lock = threading.Lock()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnstorableValue(ImgdbError):
    """A value that PostgreSQL's text or jsonb cannot hold, or too deep to store."""


def check_text(value: str, what: str) -> str:
    """``value`` if PostgreSQL text can hold it; otherwise a refusal naming ``what``."""
    if "\x00" in value:
        raise UnstorableValue(f"{what} contains a NUL character, which PostgreSQL text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableValue(f"{what} is not valid Unicode (bytes that are not UTF-8?): "
                              f"{printable(value)[:200]!r}") from None
    return value


def check_file_name(path: str) -> str:
    """A file name (or URL) imgdb will record as an image's uri, if PostgreSQL can store it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableValue("file name is not valid UTF-8, which PostgreSQL text cannot hold: rename the file") from None
    return check_text(path, "file name")


def printable(value: str) -> str:
    """``value`` fit for a one-line message or JSON: what UTF-8 cannot encode as ``\\xNN`` (the
    bytes of a file name that were not UTF-8) or ``\\udNNN``, control characters escaped."""
    try:  # bytes of a file name that were not UTF-8 (surrogateescape) show as the bytes they were
        text = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # any other lone surrogate shows as its code point
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def check_metadata(value: Any, what: str = "metadata") -> dict[str, Any]:
    """User metadata, if jsonb can hold it: an object of JSON values (strings PostgreSQL can store,
    finite numbers, booleans, null, arrays and objects up to MAX_DEPTH deep)."""
    if not isinstance(value, dict):
        raise UnstorableValue(f"{what} must be a JSON object, not {type(value).__name__}")
    _check_json(value, what, 1)
    return value


def _check_json(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnstorableValue(f"{where} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnstorableValue(f"{where} has a key that is not a string: {key!r}")
            check_text(key, f"{where}: key {printable(key)[:60]!r}")
            _check_json(item, f"{where}.{printable(key)[:60]}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnstorableValue(f"{where} is {value}, not a finite number (JSON has no NaN or Infinity)")
    elif value is not None and not isinstance(value, (bool, int)):
        raise UnstorableValue(f"{where} is a {type(value).__name__}, not a JSON value")


def loads(text: str | bytes, what: str) -> Any:
    """Parse a JSON document from outside, refusing it whole (with a reason) where it cannot be
    parsed; values inside are checked by :func:`check_metadata` where they are stored."""
    try:
        return json.loads(text)
    except RecursionError:
        pass
    except ValueError as exc:
        raise ImgdbError(f"{what} is not valid JSON: {exc}") from None
    # Deeper than Python's default recursion limit allows: parse once more with room for
    # MAX_PARSE_DEPTH levels (the C stack holds many more), so that one deep entry of a metadata
    # file is refused on its own instead of the whole file.
    with _parse_lock:
        saved = sys.getrecursionlimit()
        sys.setrecursionlimit(max(saved, MAX_PARSE_DEPTH + 100))
        try:
            return json.loads(text)
        except RecursionError:
            raise ImgdbError(f"{what} is nested deeper than {MAX_PARSE_DEPTH} levels") from None
        finally:
            sys.setrecursionlimit(saved)
