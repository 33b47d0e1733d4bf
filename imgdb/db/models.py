"""SQLAlchemy 2.0 models of imgdb's tables, for applications that already speak the ORM.

Every table lives in imgdb's schema (``imgdb``; the models name it, so they work on an application's
own engine and sessions; with another ``IMGDB_SCHEMA``, give that engine
``execution_options(schema_translate_map={"imgdb": "<schema>"})``, as imgdb does on its own).

``images`` holds one row per distinct image (by content hash); ``indexes`` is the registry of named
indexes, each with its extractor spec and ANN settings; ``index_state`` keeps whatever an extractor
learned from the collection (codebooks, PCA matrices) as named arrays, so that a query months later is
encoded exactly as the collection was; ``networks`` the fine-tuned networks (``imgdb train``) that
extractor specs name by the sha256 of their weights; ``local_features`` each image's keypoints for
spatial verification (``--rerank verify``). Each index's vectors live in a table of their own,
``vectors_<index id>``, because pgvector indexes need one fixed dimension per column (``vector``, or
``halfvec`` at half the bytes); map it with :func:`vectors_model`::

    from sqlalchemy import select
    from imgdb.orm import Image, vectors_model

    V = vectors_model(session, "default")
    hits = session.scalars(
        select(Image).join(V, V.image_id == Image.id)
        .where(Image.metadata_["author"].astext == "Joan Miró")
        .order_by(V.embedding.l2_distance(query_vector)).limit(10)
    )

Application tables attached to an index (``imgdb attach``) are :class:`Source` rows; :class:`Ref`
maps each of their rows' keys to the image it holds. :func:`index_model` maps an index's SQL view,
whose ``ref`` column has the type of the application's key, for joins with the application's own
models.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pgvector.sqlalchemy import HALFVEC, Vector
from sqlalchemy import (BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, MetaData, String,
                        Table, Text, func, select)
from sqlalchemy.dialects.postgresql import JSONB, OID
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, registry

from imgdb.db.records import VIEW_PREFIX, IndexNames, view_name  # noqa: F401 - (VIEW_PREFIX: the ORM's name too)
from imgdb.db.schema import DEFAULT_SCHEMA
from imgdb.errors import IndexNotFound


class Base(DeclarativeBase):
    """Declarative base of imgdb's models (its metadata is what the migrations create), all in
    imgdb's schema."""

    metadata = MetaData(schema=DEFAULT_SCHEMA)


class Image(Base):
    """One distinct image: where it came from, what it is, and the user's metadata."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    uri: Mapped[str] = mapped_column(Text, index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(Text)
    file_size: Mapped[int] = mapped_column(BigInteger)
    taken_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=False))
    camera: Mapped[str | None] = mapped_column(Text)
    # ``metadata`` is reserved on declarative classes; the column keeps the plain name for SQL users.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default="{}")
    added_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SearchIndex(Base, IndexNames):
    """A named index: which extractor fills it, and how its vectors are searched."""

    __tablename__ = "indexes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    extractor: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(Text, server_default="l2")
    storage: Mapped[str] = mapped_column(Text, server_default="vector")
    ann: Mapped[str] = mapped_column(Text, server_default="hnsw")
    ann_params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    #: The local feature spec its hits are verified with (``--rerank verify``), or None.
    local: Mapped[str | None] = mapped_column(Text)
    #: Goes up with every statement that writes this index's vectors (a trigger on its table).
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IndexState(Base):
    """A named array an extractor learned for one index, stored as ``.npy`` bytes."""

    __tablename__ = "index_state"

    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class Network(Base):
    """A fine-tuned network (``imgdb train``): the weights that differ from its backbone's, named by
    their sha256 as extractor specs name them, and how it was trained."""

    __tablename__ = "networks"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    backbone: Mapped[str] = mapped_column(Text)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    method: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    images: Mapped[int] = mapped_column(Integer)
    loss: Mapped[list[float]] = mapped_column(JSONB, server_default="[]")
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LocalFeatures(Base):
    """One image's keypoints and descriptors for spatial verification, per local feature spec
    (:mod:`imgdb.db.local_features`)."""

    __tablename__ = "local_features"

    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    spec: Mapped[str] = mapped_column(Text, primary_key=True)
    #: Detection frame size over the image's: keypoint ``xy / scale`` is in the image's pixels.
    scale: Mapped[float] = mapped_column(Float)
    keypoints: Mapped[int] = mapped_column(Integer)
    #: float32 ``(keypoints, 2)`` positions in the detection frame.
    xy: Mapped[bytes] = mapped_column(LargeBinary)
    #: uint8 ``(keypoints, dim)`` quantized descriptors.
    descriptors: Mapped[bytes] = mapped_column(LargeBinary)


class _Judged:
    """What the duplicates job keeps of a judged pair or a group member: the level, the descriptor
    distance, the calibrated score and, where verified, the inliers."""

    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    #: ``near`` (the same picture) or ``similar`` (the same scene).
    level: Mapped[str] = mapped_column(Text)
    distance: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    inliers: Mapped[int | None] = mapped_column(Integer)


class DuplicatePair(_Judged, Base):
    """A pair of an index's images judged duplicates (``imgdb duplicates``), ``image_id < other_id``."""

    __tablename__ = "duplicate_pairs"

    other_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    #: Set by ``imgdb duplicates resolve``: the pair never groups again.
    resolved: Mapped[bool] = mapped_column(Boolean, server_default="false")


class DuplicateMember(_Judged, Base):
    """An image in a group of duplicates, with its evidence against the group's representative."""

    __tablename__ = "duplicate_members"

    level: Mapped[str] = mapped_column(Text, primary_key=True)
    #: The group's representative's image id (a group holds one level: ``(level, group_id)`` names it).
    group_id: Mapped[int] = mapped_column(BigInteger)


class DuplicateChecked(Base):
    """An image whose nearest neighbours the duplicates job has judged (later runs skip it)."""

    __tablename__ = "duplicate_checked"

    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)


class ImagePath(Base):
    """Another path or URL at which a direct ingest found an image's bytes (``images.uri`` is the first)."""

    __tablename__ = "image_paths"

    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    uri: Mapped[str] = mapped_column(Text, primary_key=True)


class Source(Base):
    """An application table attached to an index: which column holds its images, and its key."""

    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"))
    #: The table's oid: it follows the table through a rename.
    relid: Mapped[int] = mapped_column(OID)
    #: The table's qualified name when it was attached (for messages once it is gone).
    table_name: Mapped[str] = mapped_column(Text)
    column_name: Mapped[str] = mapped_column(Text)
    #: ``text`` (a path or an http(s) URL per row) or ``bytea`` (the image itself).
    column_kind: Mapped[str] = mapped_column(Text)
    key_column: Mapped[str] = mapped_column(Text)
    #: The key's SQL type (``format_type``), e.g. ``integer``, ``uuid``, ``text``.
    key_type: Mapped[str] = mapped_column(Text)
    #: Relative paths resolve under this folder, and paths outside it are refused (None: absolute only).
    root: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Ref(Base):
    """One row of an attached table, by its key in text form, and the image it holds now."""

    __tablename__ = "refs"

    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True)
    ref: Mapped[str] = mapped_column(Text, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    synced_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FailedRow(Base):
    """A row of an attached table that could not be embedded, with the reason, retried with back-off."""

    __tablename__ = "failures"

    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True)
    ref: Mapped[str] = mapped_column(Text, primary_key=True)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    first_failed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_failed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    #: When the next sync tries the row again (None: it is back in the queue now).
    retry_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


_vector_models: dict[tuple[str, int, str], type[Base]] = {}


def vectors_model(session: Session, name: str) -> type[Base]:
    """The ORM class mapped onto index ``name``'s vectors table (built once per process).

    Its columns are ``image_id`` (a foreign key to :class:`Image`) and ``embedding``, a pgvector
    column whose ``l2_distance``/``cosine_distance`` comparators are served by the index's
    HNSW/IVFFlat index.
    """
    index = session.scalar(select(SearchIndex).where(SearchIndex.name == name))
    if index is None:
        raise IndexNotFound(f"no index named {name!r}")
    key = (index.vectors_table, index.dim, index.storage)
    if key not in _vector_models:
        column_type = HALFVEC(index.dim) if index.storage == "halfvec" else Vector(index.dim)
        _vector_models[key] = type(
            f"Vectors_{index.id}_{index.dim}",
            (Base,),
            {
                "__tablename__": index.vectors_table,
                # Not part of the migrated schema: these tables are created per index at run time.
                "__table_args__": {"info": {"per_index": True}, "extend_existing": True},
                "image_id": mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
                "embedding": mapped_column(column_type),
                # The vector's PQ/LSH code, for indexes whose first stage runs in Python.
                "ann_code": mapped_column(LargeBinary, nullable=True),
                # False where only attached tables' rows put the image in this index (imgdb sync).
                "direct": mapped_column(Boolean, server_default="true"),
                "__annotations__": {"image_id": Mapped[int], "embedding": Mapped[Any], "ann_code": Mapped[Any],
                                    "direct": Mapped[bool]},
            },
        )
    return _vector_models[key]


_index_models: dict[tuple[str, str, str], type] = {}


def index_model(session: Session, name: str) -> type:
    """A read-only class mapped onto index ``name``'s SQL view (``images_<name>``): the columns of
    :class:`Image`, ``embedding``, and ``ref`` (the key of the attached table's row that holds the
    image, typed as that key) and ``source`` (the table), for joins with the application's own models::

        Hit = index_model(session, "default")
        session.execute(select(Photo, Hit.embedding.l2_distance(q).label("distance"))
                        .join(Hit, Hit.ref == Photo.id).where(Photo.owner == "alice")
                        .order_by("distance").limit(10))

    Needs nothing but SELECT on the view (what ``imgdb db grant`` gives an application role). The
    view is reflected (``ref`` takes whatever type the key has), once per process and type.
    """
    connection = session.connection()
    schema = connection.get_execution_options().get("schema_translate_map", {}).get(DEFAULT_SCHEMA, DEFAULT_SCHEMA)
    relation = view_name(name)
    try:
        view = Table(relation, MetaData(), schema=schema, autoload_with=connection)
    except NoSuchTableError:
        raise IndexNotFound(f"no index named {name!r} (no view {schema}.{relation})") from None
    key = (schema, relation, f"{view.c.ref.type!r}/{view.c.embedding.type!r}")
    if key not in _index_models:
        cls = type(f"Index_{name}", (), {"__doc__": f"A row of {schema}.{relation} (read-only)."})
        registry().map_imperatively(cls, view, primary_key=[view.c.id, view.c.ref])
        _index_models[key] = cls
    return _index_models[key]
