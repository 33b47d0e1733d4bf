"""SQL of duplicates (:mod:`imgdb.jobs.duplicates`): judged pairs, groups, what has been compared,
and the other paths at which stored bytes were found again.

Exact duplicates are not judged: they are an image's other paths (``image_paths``, written by
ingest) and the rows of attached tables that hold it (``refs``), read where they are by the index's
view (:func:`imgdb.db.derived.create_view`), as every level is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from imgdb.db.models import DuplicateChecked, DuplicateMember, DuplicatePair, Image, ImagePath
from imgdb.db.records import IndexRecord
from imgdb.db.schema import quote

_pairs, _members, _checked = DuplicatePair.__table__, DuplicateMember.__table__, DuplicateChecked.__table__
#: The levels the job judges (``exact`` is read from ``refs``), and every level there is.
JUDGED = ("near", "similar")
LEVELS = ("exact", *JUDGED)
#: Paths looked up per statement when recording where stored content was found again.
PATHS_CHUNK = 10_000


@dataclass(frozen=True)
class Judged:
    """A pair's verdict and evidence: ``level`` is ``near``, ``similar``, or None (neither)."""

    level: str | None
    distance: float
    score: float
    inliers: int | None = None
    #: Resolved by the user (:func:`resolve`): it never groups again.
    resolved: bool = False


def unchecked(conn: Connection, index: IndexRecord) -> list[int]:
    """The index's images whose neighbours no run has judged yet, in id order."""
    return list(conn.execute(sa.text(
        f'SELECT v.image_id FROM "{index.vectors_table}" v WHERE NOT EXISTS (SELECT 1 FROM duplicate_checked c'
        " WHERE c.index_id = :i AND c.image_id = v.image_id) ORDER BY v.image_id"), {"i": index.id}).scalars())


def ever_compared(conn: Connection, index: IndexRecord) -> bool:
    """Whether a duplicates run ever compared the index's images."""
    return bool(conn.execute(sa.select(sa.exists().where(_checked.c.index_id == index.id))).scalar())


def record(conn: Connection, index: IndexRecord, checked: Sequence[int],
           pairs: dict[tuple[int, int], Judged]) -> None:
    """Keep the pairs judged duplicates (a pair judged again takes the new verdict) and mark
    ``checked`` as compared, in the caller's transaction: a run killed later resumes after them."""
    found = [{"index_id": index.id, "image_id": a, "other_id": b, "level": j.level, "distance": j.distance,
              "score": j.score, "inliers": j.inliers} for (a, b), j in pairs.items() if j.level is not None]
    if found:
        statement = insert(_pairs)
        conn.execute(statement.on_conflict_do_update(
            index_elements=["index_id", "image_id", "other_id"],
            set_={c: statement.excluded[c] for c in ("level", "distance", "score", "inliers")}), found)
    if checked:
        conn.execute(insert(_checked).on_conflict_do_nothing(),
                     [{"index_id": index.id, "image_id": image_id} for image_id in checked])


def pairs(conn: Connection, index: IndexRecord) -> dict[tuple[int, int], Judged]:
    """Every duplicate pair kept for the index whose two images it still holds. (The second image is
    looked up apart: on a Citus cluster a join on it would not be on the tables' shard key.)"""
    rows = conn.execute(sa.text(
        "SELECT p.image_id, p.other_id, p.level, p.distance, p.score, p.inliers, p.resolved FROM duplicate_pairs p"
        f' JOIN "{index.vectors_table}" v ON v.image_id = p.image_id WHERE p.index_id = :i'), {"i": index.id}).all()
    held = set(conn.execute(sa.text(f'SELECT image_id FROM "{index.vectors_table}"')).scalars())
    return {(a, b): Judged(level, distance, score, inliers, resolved)
            for a, b, level, distance, score, inliers, resolved in rows if b in held}


def sizes(conn: Connection, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Width and height of each image."""
    rows = conn.execute(sa.text("SELECT id, width, height FROM images WHERE id = ANY(:ids)"), {"ids": list(ids)})
    return {image_id: (width, height) for image_id, width, height in rows}


def replace_groups(conn: Connection, index: IndexRecord, members: Sequence[dict[str, Any]]) -> None:
    """Make ``members`` (``level``, ``group_id``, ``image_id`` and the evidence) the index's groups."""
    conn.execute(sa.delete(_members).where(_members.c.index_id == index.id))
    if members:
        conn.execute(sa.insert(_members), [{"index_id": index.id, **m} for m in members])


def groups(conn: Connection, index: IndexRecord, level: str | None = None, *, limit: int | None = None,
           offset: int = 0) -> list[dict[str, Any]]:
    """The index's groups (of ``level``, or every level), as its view ``duplicates_<name>`` has them
    (:func:`imgdb.db.derived.create_view`): each ``{"group", "level", "representative", "images"}``,
    the representative first, then by score. A member of a ``near`` or ``similar`` group is one entry
    (with the attached rows that hold it, as search hits have them); an ``exact`` group lists each
    copy: each path, URL or attached row at which the same bytes were found. ``limit`` groups from
    the ``offset``-th, by level then group: a page, as a collection of a million images has too
    many groups for one answer."""
    view = quote(index.duplicates_relation)
    rows = conn.execute(sa.text(
        f'WITH page AS (SELECT level, "group" FROM {view} WHERE CAST(:level AS text) IS NULL OR level = :level'
        '     GROUP BY level, "group" ORDER BY level, "group" LIMIT :limit OFFSET :offset)'
        ' SELECT d."group", d.level, d.image_id, d.uri, d.ref::text, d.source::text, d.score, d.distance, d.inliers'
        f' FROM {view} d JOIN page USING (level, "group")'
        ' ORDER BY d.level, d."group", NOT d.representative, d.score DESC, d.image_id, d.ref IS NOT NULL, d.uri,'
        ' d.ref::text'),
        {"level": level, "limit": limit, "offset": offset}).all()
    sources = {s.table: s for s in index.sources}
    by_group: dict[tuple[str, int], dict[str, Any]] = {}
    entries: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group_id, lvl, image_id, uri, ref, table, score, distance, inliers in rows:
        group = by_group.setdefault((lvl, group_id), {"group": group_id, "level": lvl, "representative": group_id,
                                                       "images": []})
        key = (lvl, group_id, image_id, uri, ref) if lvl == "exact" else (lvl, group_id, image_id)
        if key not in entries:
            entries[key] = {"id": image_id, "uri": uri, "score": round(score, 4), "distance": round(distance, 4),
                            **({"inliers": inliers} if inliers is not None else {})}
            group["images"].append(entries[key])
        if table is not None and table in sources:
            found = {"table": table, "ref": sources[table].ref_json(ref)}
            entries[key].setdefault("refs", []).append(found)
            entries[key].setdefault("table", table)
            entries[key].setdefault("ref", found["ref"])
    return list(by_group.values())


def count_groups(conn: Connection, index: IndexRecord, level: str | None = None) -> int:
    """How many groups (of ``level``, or of every level) the index has: what pages of :func:`groups` add up to."""
    return conn.execute(sa.text(
        f'SELECT count(DISTINCT (level, "group")) FROM {quote(index.duplicates_relation)}'
        ' WHERE CAST(:level AS text) IS NULL OR level = :level'), {"level": level}).scalar_one()


def record_paths(conn: Connection, found: Sequence[tuple[str, str]]) -> None:
    """Remember the other paths or URLs at which content already stored was found again, as
    ``(sha256, uri)``: the ``exact`` level of duplicates."""
    for start in range(0, len(found), PATHS_CHUNK):  # (a rerun of a large folder finds all of it again)
        chunk = found[start:start + PATHS_CHUNK]
        stored = {sha: (image_id, uri) for sha, image_id, uri in conn.execute(
            sa.select(Image.sha256, Image.id, Image.uri).where(Image.sha256.in_(sorted({sha for sha, _ in chunk}))))}
        rows = sorted({(stored[sha][0], uri) for sha, uri in chunk if sha in stored and stored[sha][1] != uri})
        if rows:
            conn.execute(insert(ImagePath.__table__).on_conflict_do_nothing(),
                         [{"image_id": image_id, "uri": uri} for image_id, uri in rows])


def members(conn: Connection, index: IndexRecord, level: str, group: int) -> list[int]:
    """The image ids of one group, the representative first."""
    return list(conn.execute(sa.select(_members.c.image_id).where(
        _members.c.index_id == index.id, _members.c.level == level, _members.c.group_id == group).order_by(
        _members.c.image_id != group, _members.c.image_id)).scalars())


def resolve(conn: Connection, index: IndexRecord, level: str, group: int) -> None:
    """Mark every judged pair within a group resolved, and drop the group: its images never group
    together again (each may still group with others)."""
    ids = members(conn, index, level, group)
    conn.execute(sa.update(_pairs).where(_pairs.c.index_id == index.id, _pairs.c.image_id.in_(ids),
                                         _pairs.c.other_id.in_(ids)).values(resolved=True))
    conn.execute(sa.delete(_members).where(_members.c.index_id == index.id, _members.c.level == level,
                                           _members.c.group_id == group))


def held_by_rows(conn: Connection, ids: Sequence[int]) -> list[str]:
    """The attached tables whose rows hold any of ``ids`` (what imgdb must not delete behind them)."""
    return list(conn.execute(sa.text(
        "SELECT DISTINCT s.table_name FROM refs r JOIN sources s ON s.id = r.source_id WHERE r.image_id = ANY(:ids)"
        " ORDER BY 1"), {"ids": list(ids)}).scalars())


def merge_metadata(conn: Connection, keep: int, others: Sequence[int]) -> None:
    """Give image ``keep`` the metadata keys of ``others`` it lacks (the older image's value first)."""
    found = dict(conn.execute(sa.select(Image.id, Image.metadata_).where(Image.id.in_([keep, *others]))).all())
    merged: dict[str, Any] = {}
    for image_id in sorted(others, reverse=True):
        merged |= found.get(image_id) or {}
    conn.execute(sa.update(Image).where(Image.id == keep).values(metadata_=merged | (found.get(keep) or {})))


def forget(conn: Connection, index: IndexRecord) -> None:
    """Drop what the job knows of the index (its descriptors changed: every pair must be judged again)."""
    for table in (_pairs, _members, _checked):
        conn.execute(sa.delete(table).where(table.c.index_id == index.id))
