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

An import trusts nothing in the file: members are read by name with a size limit each (a zip
bomb declares its sizes), JSON through :func:`imgdb.db.values.loads`, arrays without pickles, every
image's facts and metadata checked, every network's bytes against its hash; the index and its
images land in one transaction, or nothing does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from imgdb.ann.registry import parse_ann
from imgdb.catalog import Catalog
from imgdb.db import images, local_features, networks, state, values, vectors
from imgdb.db.records import IndexRecord, StoredNetwork, check_name
from imgdb.errors import ImgdbError
from imgdb.features import keypoints
from imgdb.features.registry import extractor_class
from imgdb.features.spec import parse_spec
from imgdb.io.reader import SHA256_HEX, ImageFacts

FORMAT = "imgdb-index"
VERSION = 1
#: The largest member an import reads (the vectors of ten million 1,280-d images would not fit anyway).
MAX_MEMBER_BYTES = 8 * 2**30
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
    counts, scale, xy, codes = (_array(archive, f"local/{key}.npy") for key in ("counts", "scale", "xy", "codes"))
    if counts.dtype != np.int32 or counts.shape != (count,) or counts.min(initial=0) < -1 \
            or counts.max(initial=0) > spec.keypoints:
        raise ImgdbError(f"local/counts.npy must hold {count} int32 counts from -1 to {spec.keypoints}")
    total = int(counts[counts > 0].sum())
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


def import_index(catalog: Catalog, path: str | Path, name: str | None = None) -> dict[str, Any]:
    """Create an index from an export (under ``name``, default its own); returns the manifest."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ImgdbError(f"{path}: not an imgdb index export ({exc})") from None
    with archive:
        manifest = _json(archive, "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ImgdbError(f"{path}: not an imgdb index export of format version {VERSION}")
        spec = _field(manifest, "index", dict)
        name = check_name(name or _field(spec, "name", str))
        extractor, dim = _field(spec, "extractor", str), _field(spec, "dim", int)
        listed = _images(_json(archive, "images.json"), _field(manifest, "images", int))
        found = _array(archive, "vectors.npy")
        if found.dtype != np.float32 or found.shape != (len(listed), dim) or not np.isfinite(found).all():
            raise ImgdbError(f"vectors.npy must hold {len(listed)} finite float32 rows of {dim} values")
        learned = {key: _array(archive, f"state/{key}.npy") for key in _keys(manifest)}
        nets = [_network(archive, sha) for sha in _field(manifest, "networks", list)]
        local = manifest.get("local")
        if local is not None and not isinstance(local, str):
            raise ImgdbError("manifest.json: local must be a local feature spec")
        features = _local_rows(archive, local, len(listed)) if local else None
    named = parse_spec(extractor)
    if not set(extractor_class(named.family).networks(named)) <= {n.sha256 for n in nets}:
        raise ImgdbError("the index's extractor names a network the file does not hold")
    for network in nets:
        catalog.store_network(network)
    # The spec checked and its model loaded now, before anything is written.
    ann = spec.get("ann", "hnsw")
    target = catalog.create_index(name, extractor, ann=_ann(ann, spec.get("ann_params")),
                                  storage=spec.get("storage", "vector"))
    if target.dim != dim:
        catalog.drop_index(name)
        raise ImgdbError(f"the extractor makes {target.dim}-dimensional vectors here, the file holds {dim}")
    try:
        with catalog.database.engine.begin() as conn:
            ids = images.upsert(conn, [(i["uri"], i["facts"], i["metadata"]) for i in listed])
            vectors.copy(conn, target, ids, found, direct=[i["direct"] for i in listed])
            state.save(conn, target, learned)
            if features is not None:
                local_features.set_spec(conn, target, str(features[0]))
                local_features.write(conn, str(features[0]), [(ids[row], scale, xy, codes)
                                                              for row, scale, xy, codes in features[1]])
    except Exception:
        catalog.drop_index(name)
        raise
    catalog.forget(target)
    catalog.layer.sync(target, relearn=True)
    return {**manifest, "index": {**spec, "name": name}}


# ------------------------------------------------------------------ reading, with suspicion


def _read(archive: zipfile.ZipFile, member: str) -> bytes:
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise ImgdbError(f"the export has no {member}") from None
    if info.file_size > MAX_MEMBER_BYTES:
        raise ImgdbError(f"{member} is {info.file_size:,} bytes: more than an import reads")
    with archive.open(info) as part:
        data = part.read(MAX_MEMBER_BYTES + 1)  # (a member that lies about its size stops here)
    if len(data) > MAX_MEMBER_BYTES:
        raise ImgdbError(f"{member} is larger than an import reads")
    return data


def _json(archive: zipfile.ZipFile, member: str) -> Any:
    return values.loads(_read(archive, member), member)


def _array(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(_read(archive, member)), allow_pickle=False)
    except ValueError as exc:
        raise ImgdbError(f"{member} is not a plain .npy array: {exc}") from None


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
            facts = ImageFacts(sha, _bounded(entry, "width"), _bounded(entry, "height"), _text(entry, "format") or "",
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
    blob = _read(archive, f"networks/{sha}.safetensors")
    record = _json(archive, f"networks/{sha}.json")
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
