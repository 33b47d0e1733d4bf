"""The fine-tuned networks' weights this process has read from its database, by sha256.

An extractor is built from its spec alone (:mod:`imgdb.features.registry`), but a spec with
``net=<sha256>`` names weights that live in the database. Whoever opens such an index
(:meth:`imgdb.client.Imgdb.extractor`) hands the bytes over here first; the extractor takes them
from here. Kept free of torch, so that the search path can ask without loading it.
"""

from __future__ import annotations

import hashlib
import re
import threading

from imgdb.errors import ExtractorSpecError

#: How a network is named: the sha256 of its weights.
SHA256 = re.compile(r"^[0-9a-f]{64}$")

_known: dict[str, bytes] = {}
_lock = threading.Lock()


def provide(sha256: str, blob: bytes) -> None:
    """Make a network's weights known, after checking they are what their hash says."""
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise ExtractorSpecError(f"network {sha256[:12]}: its stored weights do not match their sha256")
    with _lock:
        _known[sha256] = blob


def provided(sha256: str) -> bool:
    return sha256 in _known


def blob(sha256: str) -> bytes:
    """The weights of network ``sha256``, which must have been :func:`provide`-d."""
    found = _known.get(sha256)
    if found is None:
        raise ExtractorSpecError(f"network {sha256[:12]} is not loaded: it lives in the database of its index "
                                 "(open the index through imgdb.connect())")
    return found
