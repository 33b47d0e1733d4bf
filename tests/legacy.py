"""An imgdb install of the layout before its schema: what revisions 0001–0002 and that era's
``store.create_index`` made, with real images, vectors and learned state, in ``public``.

The tables come from running those migrations' own ``upgrade()`` functions against ``public`` with
alembic's version table beside them (as imgdb did then); the per-index objects are the statements
``store.create_index`` ran then, spelled out here because today's code makes other ones.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg.types.json import Jsonb

from imgdb.db.engine import alembic_config, sqlalchemy_url
from imgdb.features.registry import create_extractor
from imgdb.io.reader import ImageFacts, decode

VIEW_COLUMNS = "i.id, i.uri, i.sha256, i.width, i.height, i.format, i.file_size, i.taken_at, i.camera, i.metadata, i.added_at"


@dataclass
class LegacyIndex:
    """One index of the old layout, with what ingest would have stored in it."""

    name: str
    spec: str
    ann: str = "hnsw"
    ann_params: dict[str, Any] = field(default_factory=lambda: {"m": 16, "ef_construction": 64, "ef_search": 40})
    vectors: np.ndarray | None = None
    state: dict[str, np.ndarray] = field(default_factory=dict)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def describe(paths: list[Path], spec: str) -> tuple[list[ImageFacts], np.ndarray, dict[str, np.ndarray]]:
    """Facts, vectors and learned state of ``paths`` under ``spec``, computed by the real extractor."""
    extractor = create_extractor(spec)
    decoded = [decode(p.read_bytes(), max_pixels=10**8, scale_hint=extractor.scale_hint) for p in paths]
    prepared = [extractor.prepare(d.pixels) for d in decoded]
    if extractor.trainable:
        extractor.fit(prepared)
    return [d.facts for d in decoded], extractor.embed(prepared), extractor.state() if extractor.trainable else {}


def build(url: str, paths: list[Path], metadata: dict[str, dict[str, Any]], indexes: list[LegacyIndex]) -> None:
    """Make the old layout in ``public`` of the database at ``url``, holding ``paths`` in every index."""
    engine = sa.create_engine(sqlalchemy_url(url))
    script = ScriptDirectory.from_config(alembic_config())
    with engine.begin() as conn:
        context = MigrationContext.configure(conn)  # version table in the default schema, as then
        with Operations.context(context):
            for revision in ("0001", "0002"):
                script.get_revision(revision).module.upgrade()
        context.stamp(script, "0002")
        raw = conn.connection.driver_connection
        image_ids = []
        for path in paths:
            facts = decode(path.read_bytes(), max_pixels=10**8).facts
            image_ids.append(raw.execute(
                "INSERT INTO images (uri, sha256, width, height, format, file_size, taken_at, camera, metadata)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (str(path), facts.sha256, facts.width, facts.height, facts.format, facts.file_size, facts.taken_at,
                 facts.camera, Jsonb(metadata.get(path.name, {})))).fetchone()[0])
        for index in indexes:
            dim = index.vectors.shape[1]
            index_id = raw.execute(
                "INSERT INTO indexes (name, extractor, dim, ann, ann_params) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (index.name, index.spec, dim, index.ann, Jsonb(index.ann_params))).fetchone()[0]
            table = f'"imgdb_vectors_{index.name}"'
            raw.execute(f"CREATE TABLE {table} (image_id bigint PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,"
                        f" embedding vector({dim}) NOT NULL, ann_code bytea)")
            raw.execute(f"CREATE TRIGGER imgdb_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}"
                        f" FOR EACH STATEMENT EXECUTE FUNCTION imgdb_index_changed('{index_id}')")
            raw.execute(f'CREATE OR REPLACE VIEW "images_{index.name}" AS SELECT {VIEW_COLUMNS}, v.embedding'
                        f" FROM images i JOIN {table} v ON v.image_id = i.id")
            for image_id, vector in zip(image_ids, index.vectors):
                raw.execute(f"INSERT INTO {table} (image_id, embedding) VALUES (%s, %s::vector)",
                            (image_id, "[" + ",".join(f"{x:.9g}" for x in vector) + "]"))
            for key, array in index.state.items():
                raw.execute("INSERT INTO index_state (index_id, key, value) VALUES (%s, %s, %s)",
                            (index_id, key, npy(array)))
            column = "embedding vector_l2_ops"
            if index.ann == "bq":
                center = index.state["ann.center"]
                literal = "[" + ",".join(f"{x:.9g}" for x in center.tolist()) + "]"
                column = f"(binary_quantize(embedding - '{literal}'::vector)::bit({dim})) bit_hamming_ops"
            # IF NOT EXISTS: where index `a_ann`'s table already had this name, the old layout
            # silently had no ANN index for `a` (the collision migration 0003 ends).
            raw.execute(f'CREATE INDEX IF NOT EXISTS "imgdb_vectors_{index.name}_ann" ON {table}'
                        f" USING hnsw ({column}) WITH (m = 16, ef_construction = 64)")
    engine.dispose()
