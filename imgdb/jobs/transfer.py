"""``imgdb index export/import``: an index, with everything that encodes its queries, in one file.

The file is a zip of plain parts, readable without imgdb:

* ``manifest.json``: the format, the index (name, extractor spec, dimension, first stage, storage),
  and what else the file holds;
* ``images.json``: each image's uri, content hash, facts and user metadata, in vector order;
* ``vectors.npy``: the vectors, float32, one row per image;
* ``state/KEY.npy``: what the extractor learned from the collection (codebooks, PCA);
* ``networks/SHA256.safetensors`` and ``.json``: the fine-tuned network the spec names, and how it
  was trained;
* ``local/*.npy``, for an index that verifies its hits: the local features of its images, in image
  order (``counts`` per image, -1 for none; ``scale`` per image; ``xy`` and ``codes`` concatenated).

So a query in the database it is imported into is encoded exactly as the collection was. What a
first stage learned (PQ, LSH codes) is not carried: it is learned again from the same vectors on
import. Attached tables are not carried either: they belong to the application's database.

An import trusts nothing in the file: members are read by name, each no further than the manifest
lets it be (a zip bomb lies about its sizes), the vectors streamed a chunk at a time; JSON through
:func:`imgdb.db.values.loads`, arrays without pickles, every image's facts and metadata checked,
every network's bytes against its hash, learned state against its extractor (loaded with it, it
must describe an image as a finite vector). An archive never makes imgdb read a file of this
machine: a spec naming one (``weights=``) is refused, and an image's path is kept only inside a
folder the importing user names (``--originals``), otherwise as ``archive://PATH``, never opened;
what is served of an image gets the content type imgdb reads from its bytes, never the file's
word. An image the database holds already keeps its own record (other indexes see it). The
index, its networks, images, vectors and state land in one transaction, or nothing does: a killed
import leaves nothing a rerun trips on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgdb.ann.registry import parse_ann
from imgdb.catalog import Catalog
from imgdb.db import images, local_features, networks, state, values, vectors
from imgdb.db.records import IndexRecord, StoredNetwork, check_name
from imgdb.errors import ImgdbError, first_line
from imgdb.features import keypoints
from imgdb.features.registry import create_extractor, extractor_class
from imgdb.features.spec import PATH_OPTIONS, parse_spec
from imgdb.io.reader import FORMATS, SHA256_HEX, ImageFacts

FORMAT = "imgdb-index"
VERSION = 1
#: What an import reads of each member, at most, beside what the manifest declares (the vectors and
#: local features are read to the size their declared counts give, images.json to MAX_ENTRY_BYTES
#: an image on average).
MAX_MANIFEST_BYTES = 2**20
MAX_ENTRY_BYTES = 16 * 2**10
MAX_STATE_BYTES = 512 * 2**20
MAX_NETWORK_BYTES = 2 * 2**30
#: Room for a .npy header.
NPY_HEADER = 4096
#: Most images and the largest dimension an export may declare (pgvector's vector stops at 16,000).
MAX_IMAGES = 10**9
MAX_DIM = 16_000
#: Vectors are read, checked and written this many bytes at a time: an import never holds them all.
VECTOR_CHUNK_BYTES = 64 * 2**20
#: The uri of an imported image whose path the importing user did not vouch for (never opened).
ARCHIVED = "archive://"
_STATE_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_FACTS = ("width", "height", "format", "file_size", "taken_at", "camera")


def export_index(catalog: Catalog, name: str, path: str | Path) -> dict[str, Any]:
    """Write index ``name`` to ``path``; returns the manifest."""
    index = catalog.index(name)
    spec = parse_spec(index.extractor)
    shas = extractor_class(spec.family).networks(spec)
    with catalog.database.connect() as conn:
        rows = images.rows_of_index(conn, index)
        ids, stored = vectors.read(conn, index)
        learned = state.load(conn, index)
        found = {sha: networks.record(conn, sha) for sha in shas}
    local = _local_arrays(catalog, index, ids) if index.local else {}
    for sha, network in found.items():
        if network is None:
            raise ImgdbError(f"network {sha[:12]} of index {name!r} is missing from the database")
    if [row["id"] for row in rows] != ids.tolist():
        raise ImgdbError(f"index {name!r} changed while it was read: export it again")
    manifest = {"format": FORMAT, "version": VERSION, "images": len(rows), "state": sorted(learned),
                "networks": list(shas), "local": index.local,
                "index": {"name": index.name, "extractor": index.extractor, "dim": index.dim, "ann": index.ann,
                          "ann_params": index.ann_params, "storage": index.storage}}
    entries = [{"uri": r["uri"], "sha256": r["sha256"], "metadata": r["metadata"], "direct": r["direct"],
                **{k: r[k].isoformat() if isinstance(r[k], dt.datetime) else r[k] for k in _FACTS}} for r in rows]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=1))
        archive.writestr("images.json", json.dumps(entries, ensure_ascii=False))
        archive.writestr("vectors.npy", state.npy_bytes(stored.astype(np.float32)))
        for key, array in learned.items():
            archive.writestr(f"state/{key}.npy", state.npy_bytes(array))
        for sha, network in found.items():
            archive.writestr(f"networks/{sha}.safetensors", network.weights)
            archive.writestr(f"networks/{sha}.json", json.dumps({k: v for k, v in asdict(network).items()
                                                                  if k != "weights"}, default=str))
        for key, array in local.items():
            archive.writestr(f"local/{key}.npy", state.npy_bytes(array))
    return manifest


def _local_arrays(catalog: Catalog, index: IndexRecord, ids: np.ndarray) -> dict[str, np.ndarray]:
    spec = keypoints.parse_keypoints(index.local or "")
    found = catalog.database.searching(lambda conn: local_features.read(conn, str(spec), spec.dim, ids.tolist()))
    rows = [found.get(i) for i in ids.tolist()]
    present = [r for r in rows if r is not None]
    return {"counts": np.array([-1 if r is None else len(r[1]) for r in rows], np.int32),
            "scale": np.array([0.0 if r is None else r[0] for r in rows], np.float32),
            "xy": np.concatenate([r[1] for r in present]) if present else np.empty((0, 2), np.float32),
            "codes": np.concatenate([r[2] for r in present]) if present else np.empty((0, spec.dim), np.uint8)}


def _local_rows(archive: zipfile.ZipFile, text: str,
                count: int) -> tuple[keypoints.KeypointSpec, list[tuple[int, float, np.ndarray, np.ndarray]]]:
    """The file's local features as ``(image row, scale, xy, codes)``, every array checked."""
    try:
        spec = keypoints.parse_keypoints(text)
    except ImgdbError as exc:
        raise ImgdbError(f"the file's local feature spec: {exc}") from None
    counts, scale = (_array(archive, f"local/{key}.npy", NPY_HEADER + 4 * count) for key in ("counts", "scale"))
    if counts.dtype != np.int32 or counts.shape != (count,) or counts.min(initial=0) < -1 \
            or counts.max(initial=0) > spec.keypoints:
        raise ImgdbError(f"local/counts.npy must hold {count} int32 counts from -1 to {spec.keypoints}")
    total = int(counts[counts > 0].sum())
    xy = _array(archive, "local/xy.npy", NPY_HEADER + 8 * total)
    codes = _array(archive, "local/codes.npy", NPY_HEADER + spec.dim * total)
    if scale.dtype != np.float32 or scale.shape != (count,) or not np.isfinite(scale).all() \
            or (scale[counts >= 0] <= 0).any():
        raise ImgdbError(f"local/scale.npy must hold {count} positive float32 scales")
    if xy.dtype != np.float32 or xy.shape != (total, 2) or not np.isfinite(xy).all():
        raise ImgdbError(f"local/xy.npy must hold {total} finite float32 positions")
    if codes.dtype != np.uint8 or codes.shape != (total, spec.dim):
        raise ImgdbError(f"local/codes.npy must hold {total} uint8 rows of {spec.dim}")
    ends = np.cumsum(np.maximum(counts, 0))
    return spec, [(row, float(scale[row]), xy[end - n:end], codes[end - n:end])
                  for row, (n, end) in enumerate(zip(counts.tolist(), ends.tolist())) if n >= 0]


def import_index(catalog: Catalog, path: str | Path, name: str | None = None,
                 originals: str | Path | None = None) -> dict[str, Any]:
    """Create an index from an export (under ``name``, default its own); returns the manifest.

    ``originals``: a folder of this machine the importing user vouches for. An imported image whose
    path lies inside it keeps that path (its original and thumbnail are served from there while the
    file still hashes to the image); any other path an archive names is kept as ``archive://PATH``,
    a name never opened: an archive does not choose which files of this machine imgdb reads."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ImgdbError(f"{path}: not an imgdb index export ({exc})") from None
    vouched = None if originals is None else Path(originals).resolve()
    if vouched is not None and not vouched.is_dir():
        raise ImgdbError(f"--originals {originals}: not a folder")
    with archive:
        manifest = _json(archive, "manifest.json", MAX_MANIFEST_BYTES)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ImgdbError(f"{path}: not an imgdb index export of format version {VERSION}")
        spec = _field(manifest, "index", dict)
        name = check_name(name or _field(spec, "name", str))
        extractor, dim = _field(spec, "extractor", str), _field(spec, "dim", int)
        if set(parse_spec(extractor).options) & set(PATH_OPTIONS):
            raise ImgdbError("the export's extractor names a file (weights=PATH): an archive never makes imgdb read "
                             "a file of this machine; a network travels inside it, named by its sha256 (net=)")
        count = _field(manifest, "images", int)
        if not 0 <= count <= MAX_IMAGES or not 0 < dim <= MAX_DIM:
            raise ImgdbError(f"the export declares {count:,} images of {dim:,} values: more than an import takes")
        listed = _images(_json(archive, "images.json", MAX_MANIFEST_BYTES + count * MAX_ENTRY_BYTES), count)
        learned = {key: _state_array(archive, key) for key in _keys(manifest)}
        nets = [_network(archive, sha) for sha in _field(manifest, "networks", list)]
        local = manifest.get("local")
        if local is not None and not isinstance(local, str):
            raise ImgdbError("manifest.json: local must be a local feature spec")
        features = _local_rows(archive, local, count) if local else None
        named = parse_spec(extractor)
        if not set(extractor_class(named.family).networks(named)) <= {n.sha256 for n in nets}:
            raise ImgdbError("the index's extractor names a network the file does not hold")
        for network in nets:
            catalog.hold_network(network)
        planned = catalog.plan_index(extractor, _ann(spec.get("ann", "hnsw"), spec.get("ann_params")),
                                     spec.get("storage", "vector"))
        if planned.dim != dim:
            raise ImgdbError(f"the extractor makes {planned.dim}-dimensional vectors here, the file holds {dim}")
        _check_state(catalog, planned.extractor, learned, count)
        # Everything in one transaction: a failed or killed import leaves no index, network or image.
        with catalog.database.engine.begin() as conn:
            for network in nets:
                networks.save(conn, network)
            target = planned.create(conn, name)
            known = images.ids_by_hash(conn, [i["facts"].sha256 for i in listed])
            # (An image the database holds already keeps its own uri and metadata: other indexes see them.)
            ids = images.upsert(conn, [(_kept_uri(i["uri"], vouched), i["facts"],
                                        {} if i["facts"].sha256 in known else i["metadata"]) for i in listed])
            for start, rows in _vector_chunks(archive, count, dim):
                vectors.copy(conn, target, ids[start:start + len(rows)], rows,
                             direct=[i["direct"] for i in listed[start:start + len(rows)]])
            state.save(conn, target, learned)
            if features is not None:
                local_features.set_spec(conn, target, str(features[0]))
                local_features.write(conn, str(features[0]), [(ids[row], scale, xy, codes)
                                                              for row, scale, xy, codes in features[1]])
    catalog.forget(target)
    catalog.layer.sync(target, relearn=True)
    return {**manifest, "index": {**spec, "name": name}}


def _kept_uri(uri: str, vouched: Path | None) -> str:
    """An imported image's uri: a URL (``scheme://``, which originals and thumbnails never fetch), or
    a path inside the folder the user vouched for, as it is; any other path under the ``archive://``
    scheme."""
    if "://" in uri:
        return uri
    if vouched is not None and Path(uri).is_absolute() and Path(os.path.realpath(uri)).is_relative_to(vouched):
        return uri
    return ARCHIVED + uri


def _check_state(catalog: Catalog, spec: str, learned: dict[str, np.ndarray], count: int) -> None:
    """Refuse learned state its extractor cannot use: an extractor that learns nothing takes none;
    one that learns needs it for its vectors, and loaded with it must describe an image as a finite
    vector of its dimension (a PCA mean of the wrong shape, or NaN, fails here, not in every search)."""
    if not catalog.shared_extractor(spec).trainable:
        if learned:
            raise ImgdbError(f"the export holds learned state ({', '.join(sorted(learned))[:200]}) for an extractor "
                             "that learns nothing")
        return
    if not learned:
        if count:
            raise ImgdbError(f"the export holds vectors but not the state extractor {spec} made them with")
        return
    extractor = create_extractor(spec, catalog.context)
    try:
        extractor.load_state(dict(learned))
        probe = extractor.embed([extractor.prepare(_probe_image())])
    except Exception as exc:  # (a shape that does not fit raises whatever numpy or the model raises)
        raise ImgdbError(f"the export's learned state does not fit extractor {spec}: {first_line(exc)}") from None
    if not extractor.trained or probe.shape != (1, extractor.dim) or not np.isfinite(probe).all():
        raise ImgdbError(f"the export's learned state does not fit extractor {spec}: it describes an image as "
                         f"{'non-finite values' if probe.size and not np.isfinite(probe).all() else probe.shape}")


def _probe_image() -> Image.Image:
    """A small image with colour, edges and texture, the same every time."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    pixels[24:72, 32:96] = (200, 60, 40)
    return Image.fromarray(pixels)


# ------------------------------------------------------------------ reading, with suspicion


def _open(archive: zipfile.ZipFile, member: str) -> zipfile.ZipExtFile:
    try:
        return archive.open(archive.getinfo(member))
    except KeyError:
        raise ImgdbError(f"the export has no {member}") from None


def _read(archive: zipfile.ZipFile, member: str, limit: int) -> bytes:
    """A member's bytes, refused past ``limit`` (what the manifest lets it hold), whatever size the
    zip declares for it: decompression stops there."""
    with _open(archive, member) as part:
        data = part.read(limit + 1)
    if len(data) > limit:
        raise ImgdbError(f"{member} is larger than the manifest lets it be ({limit:,} bytes)")
    return data


def _json(archive: zipfile.ZipFile, member: str, limit: int) -> Any:
    return values.loads(_read(archive, member, limit), member)


def _header(part: zipfile.ZipExtFile, member: str) -> tuple[np.dtype, tuple[int, ...]]:
    """A ``.npy`` member's declared dtype and shape: numbers only (no pickled objects), C order."""
    try:
        version = np.lib.format.read_magic(part)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read(part)
    except (ValueError, KeyError, EOFError) as exc:
        raise ImgdbError(f"{member} is not a plain .npy array: {exc}") from None
    if fortran or dtype.hasobject or dtype.kind not in "biuf":
        raise ImgdbError(f"{member} is not a plain .npy array of numbers")
    return dtype, shape


def _array(archive: zipfile.ZipFile, member: str, limit: int) -> np.ndarray:
    """A ``.npy`` member: its header read first and the size it declares checked against ``limit``
    before a byte of the array is read, then exactly that many bytes, and nothing after them."""
    with _open(archive, member) as part:
        dtype, shape = _header(part, member)
        size = dtype.itemsize * math.prod(shape)
        if size > limit:
            raise ImgdbError(f"{member} declares {size:,} bytes, more than the manifest lets it be ({limit:,})")
        found = np.empty(shape, dtype)
        buffer, filled = memoryview(found.reshape(-1).view(np.uint8)), 0
        while filled < size and (n := part.readinto(buffer[filled:])):
            filled += n
        if filled != size or part.read(1):
            raise ImgdbError(f"{member} does not hold the {size:,} bytes its header declares")
    return found


def _state_array(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    """One array an extractor learned: numbers, all finite (whether they fit is :func:`_check_state`'s)."""
    found = _array(archive, f"state/{key}.npy", MAX_STATE_BYTES)
    if not np.isfinite(found).all():
        raise ImgdbError(f"state/{key}.npy holds values that are not finite")
    return found


def _vector_chunks(archive: zipfile.ZipFile, count: int, dim: int) -> Iterator[tuple[int, np.ndarray]]:
    """``vectors.npy`` streamed in chunks of rows (first row, rows): its header must say what the
    manifest does (``count`` float32 rows of ``dim``), every value finite, nothing past the last row."""
    with _open(archive, "vectors.npy") as part:
        dtype, shape = _header(part, "vectors.npy")
        if dtype != np.dtype("<f4") or shape != (count, dim):
            raise ImgdbError(f"vectors.npy must be a plain .npy array of {count} float32 rows of {dim} values")
        rows = max(1, VECTOR_CHUNK_BYTES // (4 * dim))
        for start in range(0, count, rows):
            n = min(rows, count - start)
            data = part.read(n * dim * 4)
            if len(data) != n * dim * 4:
                raise ImgdbError(f"vectors.npy ends before its {count} rows")
            chunk = np.frombuffer(data, "<f4").reshape(n, dim)
            if not np.isfinite(chunk).all():
                raise ImgdbError("vectors.npy must hold finite float32 values only")
            yield start, chunk
        if part.read(1):
            raise ImgdbError(f"vectors.npy holds more than its {count} rows")


def _field(document: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ImgdbError(f"the export's {key!r} is missing or not a {names}")
    return value


def _keys(manifest: dict[str, Any]) -> list[str]:
    keys = _field(manifest, "state", list)
    if not all(isinstance(k, str) and _STATE_KEY.fullmatch(k) for k in keys):
        raise ImgdbError("the export's state keys must be short names of letters, digits and _")
    return keys


def _ann(method: str, params: Any) -> str:
    if not isinstance(method, str) or not (params is None or isinstance(params, dict)):
        raise ImgdbError("the export's first stage is not an ANN spec")
    return str(parse_ann(method, params))


def _images(entries: Any, count: int) -> list[dict[str, Any]]:
    """Each image's uri, facts, metadata and direct flag, checked as ingest checks them."""
    if not isinstance(entries, list) or len(entries) != count:
        raise ImgdbError(f"images.json must list the manifest's {count} images")
    out = []
    for n, entry in enumerate(entries):
        try:
            sha = _field(entry, "sha256", str)
            if not SHA256_HEX.fullmatch(sha):
                raise ImgdbError("sha256 is not 64 hex digits")
            taken = entry.get("taken_at")
            if (found := _text(entry, "format")) and found not in FORMATS:
                raise ImgdbError(f"format {found[:20]!r} is not one imgdb reads")
            facts = ImageFacts(sha, _bounded(entry, "width"), _bounded(entry, "height"), found or "",
                               _bounded(entry, "file_size", 2**62), dt.datetime.fromisoformat(taken) if taken else None,
                               _text(entry, "camera"))
            out.append({"uri": values.check_file_name(_field(entry, "uri", str)), "facts": facts,
                        "metadata": values.check_metadata(_field(entry, "metadata", dict)),
                        "direct": bool(entry.get("direct", True))})
        except (ImgdbError, TypeError, ValueError) as exc:
            raise ImgdbError(f"images.json, image {n + 1}: {exc}") from None
    if len({i["facts"].sha256 for i in out}) != len(out):
        raise ImgdbError("images.json lists the same image (content hash) twice")
    return out


def _bounded(entry: dict[str, Any], key: str, limit: int = 2**31 - 1) -> int:
    value = _field(entry, key, int)
    if not 0 <= value <= limit:
        raise ImgdbError(f"{key} {value} is out of range")
    return value


def _text(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise ImgdbError(f"{key} is not text")
    return None if value is None else values.check_text(value, key)


def _network(archive: zipfile.ZipFile, sha: Any) -> StoredNetwork:
    """A network: its bytes checked against its name, its record's fields typed."""
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        raise ImgdbError("the export names a network by something that is not a sha256")
    blob = _read(archive, f"networks/{sha}.safetensors", MAX_NETWORK_BYTES)
    record = _json(archive, f"networks/{sha}.json", MAX_MANIFEST_BYTES)
    if not isinstance(record, dict):
        raise ImgdbError(f"networks/{sha}.json is not an object")
    if hashlib.sha256(blob).hexdigest() != sha:
        raise ImgdbError(f"networks/{sha}.safetensors: its weights do not match their sha256")
    loss = _field(record, "loss", list)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in loss):
        raise ImgdbError(f"networks/{sha}.json: loss must be finite numbers")
    return StoredNetwork(sha, values.check_text(_field(record, "backbone", str), "backbone"), blob,
                         values.check_text(_field(record, "method", str), "method"),
                         values.check_metadata(_field(record, "params", dict), "params"), _bounded(record, "images"),
                         [float(x) for x in loss], float(_field(record, "seconds", (int, float))))
