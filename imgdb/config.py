"""Settings read from the environment, in one place.

imgdb is configured the way the contract in ``../shared/CONVENTIONS.md`` fixes it:
``IMGDB_DATABASE_URL`` picks an external PostgreSQL (``IMGDB_READ_DATABASE_URL`` a read replica of it
for searches), ``IMGDB_HOME`` the private directory of the
embedded one, ``IMGDB_SCHEMA`` the one schema imgdb keeps everything in. The remaining variables tune the limits on hostile input, so that a
deployment can widen them without code changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from imgdb.io.fetch import FetchLimits
from imgdb.io.reader import DecodeLimits


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _cores() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """Where imgdb keeps its data and how far it trusts its input."""

    database_url: str | None = None
    #: A read replica of that database (``IMGDB_READ_DATABASE_URL``, a streaming standby): searches
    #: read there, as fresh as its replay; writes, migrations and what writers read stay on the primary.
    read_database_url: str | None = None
    #: The schema that holds everything imgdb creates (checked when a database is opened).
    schema: str = "imgdb"
    home: Path = field(default_factory=lambda: Path(platformdirs.user_data_dir("imgdb")))
    #: What decoding one image may cost (pixels from the header; memory per image and for all the
    #: process's decodes at once), checked before any pixel is decoded (decompression bombs).
    decoding: DecodeLimits = field(default_factory=DecodeLimits)
    fetch: FetchLimits = field(default_factory=FetchLimits)
    #: Bearer token of the HTTP API's write endpoints; None turns them off.
    api_token: str | None = None
    #: The HTTP API's address as clients reach it (behind a proxy), for the URLs it hands out;
    #: None: URLs relative to the server.
    public_url: str | None = None
    #: Query forward passes one process runs at once (the web server's concurrent searches). One
    #: pass on one image leaves cores idle, so a few in parallel serve more; dozens only share the
    #: same cores and memory. One per core served as much as any setting (benchmarks/inference_gate.py).
    inference_threads: int = field(default_factory=_cores)
    #: Where networks run: ``auto`` (CUDA when a GPU is visible), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: What runs CNN forward passes: ``onnx`` (ONNX Runtime, a graph exported once and cached under
    #: ``home/cache``) or ``torch`` (PyTorch eager). Vectors agree to a cosine of 0.9999.
    runtime: str = "onnx"

    @classmethod
    def from_env(cls) -> Settings:
        home = os.environ.get("IMGDB_HOME")
        return cls(
            database_url=os.environ.get("IMGDB_DATABASE_URL") or None,
            read_database_url=os.environ.get("IMGDB_READ_DATABASE_URL") or None,
            schema=os.environ.get("IMGDB_SCHEMA") or cls.schema,
            home=Path(home).expanduser() if home else Path(platformdirs.user_data_dir("imgdb")),
            decoding=DecodeLimits(
                max_pixels=_env_int("IMGDB_MAX_PIXELS", DecodeLimits.max_pixels),
                max_bytes=_env_int("IMGDB_DECODE_MAX_BYTES", DecodeLimits.max_bytes),
                in_flight=_env_int("IMGDB_DECODE_IN_FLIGHT", DecodeLimits.in_flight),
                jpeg_draft=_env_bool("IMGDB_JPEG_DRAFT", DecodeLimits.jpeg_draft),
            ),
            fetch=FetchLimits(
                max_bytes=_env_int("IMGDB_FETCH_MAX_BYTES", FetchLimits.max_bytes),
                allow_private=_env_bool("IMGDB_ALLOW_PRIVATE_URLS"),
            ),
            api_token=os.environ.get("IMGDB_API_TOKEN") or None,
            public_url=os.environ.get("IMGDB_PUBLIC_URL") or None,
            inference_threads=max(1, _env_int("IMGDB_INFERENCE_THREADS", _cores())),
            device=(os.environ.get("IMGDB_DEVICE") or "auto").strip().lower(),
            runtime=(os.environ.get("IMGDB_RUNTIME") or "onnx").strip().lower(),
        )
