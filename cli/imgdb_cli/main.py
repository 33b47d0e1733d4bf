"""``imgdb`` commands. Each one parses its arguments, calls the library, and prints the result."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

import imgdb
from imgdb_cli.output import emit_json, guarded, progress_bar, say, shorten, stdout, training_bars

app = typer.Typer(help="Content-based image retrieval inside PostgreSQL + pgvector.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
index_app = typer.Typer(help="Create and list indexes.", no_args_is_help=True)
db_app = typer.Typer(help="The database imgdb uses (embedded or IMGDB_DATABASE_URL).", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(db_app, name="db")
duplicates_app = typer.Typer(help="Groups of duplicate images, and settling them.")
app.add_typer(duplicates_app, name="duplicates")

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on failure.")]
IndexName = Annotated[str, typer.Option("--index", "-i", help="Index to use.")]
# Generated from the registries: a method or re-ranker a package registers shows here with no edit.
AnnHelp = imgdb.ann_help()
Rerank = Annotated[str, typer.Option("--rerank", help=imgdb.rerank_help())]
Multi = Annotated[bool, typer.Option("--multi", help="Find every gallery picture the photo shows: "
                                     "verification that sets each found picture's keypoints aside (rerank multi).")]
Fusion = Annotated[str, typer.Option("--fusion", help="With --index a,b: rrf (reciprocal-rank fusion) or mean "
                                     "(of min-max normalised distances).")]
Candidates = Annotated[Optional[int], typer.Option("--candidates", min=1, help="First-stage candidates to re-rank "
                                                   "(default: 10 per result for approximate first stages).")]


def _chain(rerank: str, multi: bool) -> str:
    """--multi: the chain with ``multi`` for ``verify`` (or after it, when it has none)."""
    if not multi:
        return rerank
    parts = [p.strip() for p in rerank.split(",")]
    return ",".join(["multi" if p == "verify" else p for p in parts] if "verify" in parts else [*parts, "multi"])


def _client() -> imgdb.Imgdb:
    return imgdb.connect()


def _parse_meta(pairs: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise imgdb.ImgdbError(f"--meta {pair!r}: expected KEY=VALUE")
        meta[key.strip()] = value
    return meta


#: A cluster's address after ``--ray``: ``HOST:PORT``, ``ray://HOST:PORT``, ``auto`` or ``local``.
RAY_ADDRESS = re.compile(r"(ray://\S+|auto|local|[\w.\-\[\]:]+:\d+)")


Ray = Annotated[bool, typer.Option("--ray", help="[ADDRESS] Extract and write on a Ray cluster's workers (pip "
                                    "install 'imgdb[ray]'): the one at ADDRESS, else $RAY_ADDRESS, else the one "
                                    "this machine runs, else a new one here.")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="With --ray, the same as --ray ADDRESS: "
                                                   "HOST:PORT of the head, ray://HOST:10001, auto or local.")]
RayActors = Annotated[Optional[int], typer.Option("--ray-actors", min=1, help="With --ray: workers (default: one "
                                                  "per node with all its cores, or one per --ray-gpus).")]
RayGpus = Annotated[float, typer.Option("--ray-gpus", min=0, help="With --ray: GPUs per worker.")]


def _ray_options(ray: bool, address: str | None, actors: int | None, gpus: float) -> imgdb.RayOptions | None:
    if not ray and (address or actors or gpus):
        raise imgdb.ImgdbError("--ray-address, --ray-actors and --ray-gpus go with --ray")
    return imgdb.RayOptions(address=address, actors=actors, gpus=gpus) if ray else None


def spell_out_ray_address(argv: list[str]) -> list[str]:
    """``--ray ADDRESS`` and ``--ray=ADDRESS`` (../shared/CONVENTIONS.md spells the option
    ``--ray [ADDRESS]``) as ``--ray --ray-address=ADDRESS``: Typer has no option whose value may
    be left out. A word after ``--ray`` that is an existing path stays one of the paths."""
    spelled: list[str] = []
    words = iter(argv)
    for word in words:
        if word.startswith("--ray="):
            spelled += ["--ray", f"--ray-address={word.removeprefix('--ray=')}"]
            continue
        spelled.append(word)
        if word == "--ray":
            following = next(words, None)
            if following is not None and RAY_ADDRESS.fullmatch(following) and not os.path.exists(following):
                spelled.append(f"--ray-address={following}")
            elif following is not None:
                spelled.append(following)
    return spelled


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (walked recursively), http(s) URLs, "
                                               "s3:// or gs:// objects and prefixes, or .txt lists of those "
                                               "(one per line).")],
    index: IndexName = "default",
    meta: Annotated[Optional[list[str]], typer.Option("--meta", help="KEY=VALUE metadata for every image.")] = None,
    metadata: Annotated[Optional[Path], typer.Option("--metadata", help="JSON file: image path -> metadata object.")] = None,
    ray: Ray = False, ray_address: RayAddress = None, ray_actors: RayActors = None, ray_gpus: RayGpus = 0.0,
    near_duplicates: Annotated[Optional[str], typer.Option(
        "--near-duplicates", help="skip: leave out an image that is the same picture as one the index holds (edited, "
        "cropped, resized...); link: add it and record the pair for `imgdb duplicates`. Reported per image.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Add images to an index (duplicates by content are skipped)."""

    def run() -> None:
        on_ray = _ray_options(ray, ray_address, ray_actors, ray_gpus)
        meta_values = _parse_meta(meta or [])
        # A path the user named that is not there is an error of the command (bad files found
        # inside a folder are only entries of `failed`): the rest goes in, then exit 1.
        missing = [p for p in paths if not imgdb.is_remote(p) and not os.path.lexists(p)]
        with progress_bar("ingesting") as on_progress:
            report = _client().ingest(paths, index=index, meta=meta_values, metadata_file=metadata,
                                      on_progress=on_progress, on_status=say, ray=on_ray,
                                      near_duplicates=near_duplicates)
        if as_json:
            emit_json(report.to_json())
        else:
            for failure in report.failed:
                say(f"failed: {failure.path}: {failure.error}")
            for near in report.near_duplicates or []:
                say(f"{near.action}: {near.path}: the same picture as "
                    f"{near.match_uri if near.match is None else f'image {near.match} ({near.match_uri})'}, "
                    f"score {near.score:.2f}")
            skipped = sum(1 for near in report.near_duplicates or [] if near.action == "skipped")
            stdout.print(f"added {report.added}, duplicates {report.duplicates}, "
                         + (f"near duplicates skipped {skipped}, " if skipped else "")
                         + f"failed {len(report.failed)} in {report.seconds:.1f} s")
        if missing:
            raise imgdb.ImgdbError(f"no such file or folder: {', '.join(missing[:3])}"
                                   + (" ..." if len(missing) > 3 else ""))

    guarded(debug, run)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="Image path, http(s) URL, or id:N.")],
    index: IndexName = "default",
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    filters: Annotated[Optional[list[str]], typer.Option("--filter", "-f", help="FIELD OP VALUE, e.g. meta.author=Joan Miró, width>=800.")] = None,
    rerank: Rerank = "exact", candidates: Candidates = None, fusion: Fusion = "rrf", multi: Multi = False,
    min_score: Annotated[Optional[float], typer.Option(
        "--min-score", min=0.0, max=1.0, help="Only hits whose score (the estimated probability that the hit is "
        "the query's picture) is at least this, however few; the index learns its scores first if it has not.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Find the images most similar to QUERY (--index a,b: in several indexes, fused)."""

    def run() -> None:
        client = _client()
        if min_score is not None and "," not in index and not client.calibrated(index):
            with progress_bar("calibrating") as on_progress:
                client.calibrate(index, on_progress=on_progress, on_status=say)
        hits = client.search(query, k=k, filters=filters or [], index=index, rerank=_chain(rerank, multi),
                             candidates=candidates, fusion=fusion, min_score=min_score)
        if as_json:
            emit_json([hit.to_json() for hit in hits])
            return
        verified = any("verified" in hit.notes for hit in hits)
        scored = any("score" in hit.notes for hit in hits)
        if stdout.width < WIDE:
            _hit_lines(hits, scored, verified)
        else:
            _hit_table(hits, scored, verified)
        if verified:
            good = ", ".join(f"id {h.id} ({h.notes['inliers']} inliers)" for h in hits if h.notes["verified"])
            stdout.print(f"verified: {good}" if good else "no match: no candidate shows the query's picture (none verified)",
                         markup=False)

    guarded(debug, run)


#: Columns from which hits are shown as a table (narrower: a line or two per hit).
WIDE = 100


def _hit_table(hits: list[imgdb.Hit], scored: bool, verified: bool) -> None:
    """Hits as a table: the uri gets the rest of the line (cut from its folders, never its name, and
    not wrapped); the metadata wraps in what is left."""
    uris = [shorten(hit.uri, max(24, stdout.width - 40)) for hit in hits]
    table = Table("id", "distance", *(["score"] if scored else []), *(["inliers"] if verified else []))
    table.add_column("uri", no_wrap=True, min_width=max(map(len, uris), default=3))
    table.add_column("metadata", overflow="fold")
    for hit, uri in zip(hits, uris):
        inliers = [f"{hit.notes['inliers']}{' verified' if hit.notes['verified'] else ''}"] if verified else []
        score = [f"{hit.notes['score']:.2f}"] if scored else []
        table.add_row(str(hit.id), f"{hit.distance:.4f}", *score, *inliers, uri,
                      json.dumps(hit.metadata, ensure_ascii=False))
    stdout.print(table)


def _hit_lines(hits: list[imgdb.Hit], scored: bool, verified: bool) -> None:
    """Hits in a narrow terminal or a pipe: a line each with its rank, id, distance (score,
    inliers) and whole uri, and under it its metadata, cut to the width."""
    for rank, hit in enumerate(hits, 1):
        facts = [f"id {hit.id}", f"distance {hit.distance:.4f}",
                 *([f"score {hit.notes['score']:.2f}"] if scored else []),
                 *([f"{hit.notes['inliers']} inliers{' verified' if hit.notes['verified'] else ''}"] if verified else [])]
        stdout.print(f"{rank:>2}. {'  '.join(facts)}  {hit.uri}", markup=False)
        if hit.metadata:
            text = json.dumps(hit.metadata, ensure_ascii=False)
            room = max(20, stdout.width - 4)
            stdout.print("    " + (text if len(text) <= room else text[:room - 1] + "…"), markup=False)


@app.command()
def explain(
    query: Annotated[str, typer.Argument(help="Image path, http(s) URL, or id:N.")],
    image_id: Annotated[int, typer.Argument(help="The hit to explain: a stored image id.")],
    index: IndexName = "default",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG to write (default: explain-ID.png).")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Draw the local-feature matches that verify (or fail to verify) a hit: a PNG, side by side."""

    def run() -> None:
        found = _client().explain(query, image_id, index=index)
        path = out or Path(f"explain-{image_id}.png")
        try:
            path.write_bytes(found.png)
        except OSError as exc:
            raise imgdb.ImgdbError(f"cannot write {path}: {exc.strerror or exc}") from None
        document = {"path": str(path), "inliers": found.inliers, "verified": found.verified}
        emit_json(document) if as_json else stdout.print(
            f"{path}: {found.inliers} inliers, {'verified' if found.verified else 'not verified'}", markup=False)

    guarded(debug, run)


@app.command()
def embed(
    query: Annotated[str, typer.Argument(help="Image path, http(s) URL, or id:N.")],
    index: IndexName = "default", as_json: Json = False, debug: Debug = False,
) -> None:
    """Print QUERY's descriptor (a pgvector literal, for SQL)."""

    def run() -> None:
        client = _client()
        vector = client.embed(query, index=index)
        if as_json:
            emit_json({"index": index, "dim": int(vector.shape[0]), "vector": [float(x) for x in vector]})
        else:
            print("[" + ",".join(f"{x:.7g}" for x in vector) + "]")

    guarded(debug, run)


@app.command()
def delete(
    ids: Annotated[list[int], typer.Argument(help="Image ids.")], as_json: Json = False, debug: Debug = False,
) -> None:
    """Remove images and their vectors from every index."""

    def run() -> None:
        deleted = _client().delete(ids)
        emit_json({"deleted": deleted}) if as_json else stdout.print(f"deleted {deleted}")

    guarded(debug, run)


@app.command("eval")
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="Data set folder: images/, queries.json, optional metadata.json.")],
    index: IndexName = "default",
    per_query: Annotated[bool, typer.Option("--per-query", help="Include every query's result.")] = False,
    rerank: Rerank = "exact", candidates: Candidates = None, fusion: Fusion = "rrf", multi: Multi = False,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Measure retrieval quality (mAP, recall@1, recall@10, and all@k for queries of several images) on a data set."""

    def run() -> None:
        with progress_bar("ingesting gallery") as on_progress:
            report = _client().evaluate(dataset, index=index, rerank=_chain(rerank, multi), candidates=candidates,
                                        fusion=fusion, on_progress=on_progress, on_status=say)
        if as_json:
            emit_json(report.to_json(per_query))
            return
        if per_query:
            for row in report.per_query:
                stdout.print(f"{row['query']}: AP {row['ap']:.3f}, first relevant at {row['first_relevant_rank']}")
        stdout.print(f"{report.index} ({report.extractor}) on {report.queries} queries, ranked by {report.rerank}: "
                     f"mAP {report.mAP:.3f}, "
                     f"recall@1 {report.recall_at_1:.3f}, recall@10 {report.recall_at_10:.3f}, "
                     f"all@1 {report.all_at_1:.3f}, all@10 {report.all_at_10:.3f}")

    guarded(debug, run)


@duplicates_app.callback(invoke_without_command=True)
def duplicates(
    ctx: typer.Context,
    index: IndexName = "default",
    level: Annotated[Optional[str], typer.Option("--level", help="exact (the same bytes at several paths or rows), "
                                                 "near (the same picture, edited) or similar (the same scene); "
                                                 "default: every level.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Nearest images each image is compared with.")] = 20,
    no_update: Annotated[bool, typer.Option("--no-update", help="List the groups as the last run left them.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, help="List this many groups (default: all).")] = None,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Groups to pass over before listing.")] = 0,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Groups of duplicate images, each with its evidence (compares the images added since the last run)."""
    if ctx.invoked_subcommand is not None:
        return

    def run() -> None:
        with progress_bar("comparing") as on_progress:
            report = _client().duplicates(index, level=level, k=k, update=not no_update, limit=limit, offset=offset,
                                          on_progress=on_progress, on_status=say)
        if as_json:
            emit_json(report.to_json())
            return
        for group in report.groups:
            stdout.print(f"{group['level']} group {group['group']} ({len(group['images'])} images)", markup=False)
            for image in group["images"]:
                where = f" {image['table']}:{image['ref']}" if "table" in image else ""
                evidence = "representative" if image is group["images"][0] else (
                    f"score {image['score']:.2f}" + (f", {image['inliers']} inliers" if "inliers" in image else ""))
                stdout.print(f"  {image['id']:>8}  {shorten(image['uri'], max(24, stdout.width - 50))}{where}  {evidence}",
                             markup=False)
        counts = {name: sum(1 for g in report.groups if g["level"] == name) for name in ("exact", "near", "similar")}
        page = "" if len(report.groups) == report.total else \
            f"; groups {offset + 1}-{offset + len(report.groups)} of {report.total} shown"
        stdout.print(f"{index}: " + ", ".join(f"{n} {name} groups" for name, n in counts.items() if level in (None, name))
                     + f" ({report.checked} images compared now{page})", markup=False)

    guarded(debug, run)


@duplicates_app.command("resolve")
def duplicates_resolve(
    group: Annotated[int, typer.Argument(help="The group (its number in `imgdb duplicates`).")],
    keep: Annotated[int, typer.Option("--keep", help="The image to keep.")],
    index: IndexName = "default",
    level: Annotated[str, typer.Option("--level", help="The group's level: near or similar.")] = "near",
    delete_others: Annotated[bool, typer.Option("--delete-others", help="Delete the group's other images.")] = False,
    merge_metadata: Annotated[bool, typer.Option("--merge-metadata", help="Give the kept image the metadata keys "
                                                 "the others have and it lacks.")] = False,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Settle a group: keep one image (the group never forms again); nothing is deleted without --delete-others."""

    def run() -> None:
        done = _client().resolve_duplicates(group, keep=keep, index=index, level=level, delete_others=delete_others,
                                            merge_metadata=merge_metadata)
        if as_json:
            emit_json(done.to_json())
            return
        stdout.print(f"{level} group {group}: kept {keep}" + (", merged the others' metadata" if done.merged else "")
                     + (f", deleted {', '.join(map(str, done.deleted))}" if done.deleted else ""), markup=False)

    guarded(debug, run)


@app.command()
def extractors(as_json: Json = False, debug: Debug = False) -> None:
    """List extractor families with their default specs."""

    def run() -> None:
        rows = imgdb.extractors()
        if as_json:
            emit_json([{"family": f, "spec": s, "description": d} for f, s, d in rows])
            return
        table = Table("family", "spec", "description")
        for row in rows:
            table.add_row(*row)
        stdout.print(table)

    guarded(debug, run)


@app.command()
def attach(
    table: Annotated[str, typer.Argument(help="The application's table: TABLE or SCHEMA.TABLE.")],
    column: Annotated[str, typer.Option("--column", "-c", help="Column holding each row's image: a file path or "
                                        "http(s) URL (text), or the image itself (bytea).")],
    key: Annotated[Optional[str], typer.Option("--key", help="Column identifying a row (default: the primary key).")] = None,
    index: IndexName = "default",
    root: Annotated[Optional[Path], typer.Option("--root", help="Folder relative paths resolve under; "
                                                 "nothing outside it is read.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Index an application's table where it stands, and follow its changes (then run `imgdb sync`)."""

    def run() -> None:
        report = _client().attach(table, column, key=key, index=index, root=root)
        emit_json(report.to_json()) if as_json else stdout.print(
            f"attached {report.table} to {report.index}: {report.queued} rows queued; `imgdb sync` embeds them",
            markup=False)

    guarded(debug, run)


@app.command()
def detach(
    table: Annotated[str, typer.Argument(help="An attached table.")],
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Detach from this index only "
                                                 "(default: from every index it is attached to).")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Stop following a table: its triggers go, and everything imgdb kept of its rows."""

    def run() -> None:
        report = _client().detach(table, index=index)
        emit_json(report.to_json()) if as_json else stdout.print(
            f"detached {report.table} from {report.index}: {report.removed} embedded rows and "
            f"{report.queued} queued changes forgotten", markup=False)

    guarded(debug, run)


@app.command()
def sync(
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Only the tables attached to this index "
                                                 "(default: every attached table).")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep going: wait for changes (LISTEN) until stopped.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Print queued, failed and embedded rows per table; "
                                         "change nothing.")] = False,
    failures: Annotated[bool, typer.Option("--failures", help="Print the rows that failed, with their reasons.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Try every failed row again now.")] = False,
    ray: Ray = False, ray_address: RayAddress = None, ray_actors: RayActors = None, ray_gpus: RayGpus = 0.0,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Embed what attached tables queued: new rows, changed images; forget deleted rows."""

    def run() -> None:
        on_ray = _ray_options(ray, ray_address, ray_actors, ray_gpus)
        client = _client()
        if status or failures:
            rows = client.sync_failures(index) if failures else client.sync_status(index)
            if as_json:
                emit_json(rows)
                return
            table = Table(*(rows[0].keys() if rows else ["table", "index"]))
            for row in rows:
                table.add_row(*(str(v) for v in row.values()))
            stdout.print(table)
            return
        if watch and on_ray is None:
            report = _watch(client, index)
        else:  # (the API refuses --watch with --ray)
            with progress_bar("syncing") as on_progress:
                report = client.sync(index, watch=watch, retry_failed=retry_failed, on_progress=on_progress,
                                     on_status=say, ray=on_ray)
        if as_json:
            emit_json(report.to_json())
            return
        for failure in report.failed:
            say(f"failed: {failure.table} {failure.ref}: {failure.error}")
        stdout.print(f"embedded {report.embedded}, removed {report.removed}, failed {len(report.failed)}, "
                     f"still queued {report.queued} in {report.seconds:.1f} s", markup=False)

    guarded(debug, run)


def _watch(client, index: str | None):  # noqa: ANN001, ANN202
    """Sync until SIGTERM or Ctrl-C, a line per round on stderr; the totals at the end."""
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def round_done(report) -> None:  # noqa: ANN001
        say(f"sync: embedded {report.embedded}, removed {report.removed}, failed {len(report.failed)}")

    say("sync: watching for changes (Ctrl-C to stop)")
    return client.sync(index, watch=True, stop=stop, on_round=round_done, on_status=say)


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="The new index: the fine-tuned network, filled with --from's images.")],
    source: Annotated[str, typer.Option("--from", help="A cnn index: its network is fine-tuned on its images.")],
    method: Annotated[str, typer.Option("--method", help="triplet (no labels), category (one --label-key), "
                                        "multitask (several), distill (with --student).")] = "triplet",
    label_key: Annotated[Optional[list[str]], typer.Option("--label-key", help="meta.KEY whose values are "
                                                           "classes (category, multitask).")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="distill: the smaller backbone (e.g. "
                                                   "tf_efficientnet_lite0) or a whole cnn: spec.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, max=1000)] = 5,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", min=0.1, help="Minutes: stop "
                                                         "training before an epoch that would end later.")] = None,
    loss: Annotated[str, typer.Option("--loss", help="triplet or contrastive.")] = "triplet",
    views: Annotated[int, typer.Option("--views", min=1, max=64, help="Synthetic photos made of each image.")] = 6,
    train_stages: Annotated[int, typer.Option("--train-stages", min=1, max=20, help="Last stages of the "
                                              "backbone that learn (the earlier ones stay frozen).")] = 3,
    eval_dataset: Annotated[Optional[Path], typer.Option("--eval", help="A data set: mAP of --from and of "
                                                         "the new index on it, before and after.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Fine-tune an index's network for retrieval on its own images, into a new index."""

    def run() -> None:
        client = _client()
        options = imgdb.TrainOptions(epochs=epochs, time_budget=None if time_budget is None else time_budget * 60,
                                     loss=loss, views=views, train_stages=train_stages)
        before = client.evaluate(eval_dataset, index=source, on_status=say) if eval_dataset else None
        with training_bars() as (on_progress, on_epoch):
            report = client.train_network(name, source, method=method, label_keys=label_key or [],
                                          student=student, options=options, on_progress=on_progress,
                                          on_status=say, on_epoch=on_epoch)
        after = client.evaluate(eval_dataset, index=name, on_status=say) if eval_dataset else None
        document = report.to_json()
        if before and after:
            document["eval"] = {"before": before.to_json(), "after": after.to_json()}
        if as_json:
            emit_json(document)
            return
        for failure in document["failed"]:
            say(f"left out: {failure['path']}: {failure['error']}")
        stdout.print(f"trained {name} from {source} ({method}) on {report.images} images in "
                     f"{report.train_seconds / 60:.1f} min, {len(report.losses)} epochs, final loss "
                     f"{report.losses[-1]:.4f}; network {report.network[:12]}; encoded {report.encoded.added} images")
        if before and after:
            stdout.print(f"on {eval_dataset}: mAP {before.mAP:.3f} -> {after.mAP:.3f}, "
                         f"recall@1 {before.recall_at_1:.3f} -> {after.recall_at_1:.3f}")

    guarded(debug, run)


@index_app.command("create")
def index_create(
    name: Annotated[str, typer.Argument(help="Index name: lower-case letters, digits, _.")],
    extractor: Annotated[Optional[str], typer.Option("--extractor", "-e", help="Extractor spec (see `imgdb extractors`).")] = None,
    ann: Annotated[Optional[str], typer.Option("--ann", help="Default: hnsw where the vectors fit it, ivfpq where they are longer. " + AnnHelp)] = None,
    storage: Annotated[str, typer.Option("--storage", help="vector (float32) or halfvec (float16: half the bytes, indexable to 4000 dims).")] = "vector",
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Local state_dict for a CNN backbone.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Create an index with an extractor and an ANN method."""

    def run() -> None:
        spec = extractor or imgdb.DEFAULT_EXTRACTOR
        if weights is not None:
            spec += f"/weights={weights.expanduser().resolve()}"
        info = _client().create_index(name, spec, ann, storage)
        emit_json(info.to_json()) if as_json else stdout.print(
            f"created {info.name}: {info.extractor} ({info.dim} dims, {info.storage}, {info.ann})", markup=False)

    guarded(debug, run)


@index_app.command("rebuild")
def index_rebuild(
    name: Annotated[str, typer.Argument(help="Index to rebuild.")],
    ann: Annotated[Optional[str], typer.Option("--ann", help="Switch to this ANN spec (default: keep the current one). " + AnnHelp)] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Rebuild an index's first stage from its stored vectors (retrains PQ/LSH codes)."""

    def run() -> None:
        info = _client().rebuild_index(name, ann, on_status=say)
        emit_json(info.to_json()) if as_json else stdout.print(f"rebuilt {info.name}: {info.ann} over {info.images} vectors",
                                                               markup=False)

    guarded(debug, run)


@index_app.command("verify")
def index_verify(
    name: Annotated[str, typer.Argument(help="The index whose hits to verify.")],
    local: Annotated[str, typer.Option("--local", help="Local features: KIND[/side=S][/keypoints=N], KIND one of "
                                       "rootsift, sift, surf, orb, kaze, akaze. keypoints is the knob for the "
                                       "bytes stored per image.")] = "rootsift",
    off: Annotated[bool, typer.Option("--off", help="Stop verifying this index.")] = False,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Keep the index's local features in the database, for `search --rerank verify`."""

    def run() -> None:
        with progress_bar("local features") as on_progress:
            report = _client().verify_index(name, None if off else local, on_progress=on_progress)
        if as_json:
            emit_json(report.to_json())
            return
        for failure in report.failed:
            say(f"{failure.path}: {failure.error}")
        if report.local is None:
            stdout.print(f"{name} no longer verifies its hits", markup=False)
        else:
            stdout.print(f"{name} verifies with {report.local}: {report.images} images, "
                         f"{report.bytes_per_image / 1024:.1f} KiB each ({report.added} added)", markup=False)

    guarded(debug, run)


@index_app.command("calibrate")
def index_calibrate(
    name: Annotated[str, typer.Argument(help="The index whose distances to learn the meaning of.")],
    sample: Annotated[int, typer.Option("--sample", min=1, help="Images to learn from (each edited 7 ways).")] = 100,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Learn what the index's distances mean: hits then carry a score, and search takes --min-score."""

    def run() -> None:
        with progress_bar("calibrating") as on_progress:
            report = _client().calibrate(name, sample=sample, on_progress=on_progress, on_status=say)
        if as_json:
            emit_json(report.to_json())
            return
        for failure in report.failed:
            say(f"{failure.path}: {failure.error}")
        stdout.print(f"{name} learned its scores from {report.images} images ({report.same} edited copies, "
                     f"{report.different} different pictures{', verified' if report.verified else ''}): "
                     f"a distance of {report.distance_at_half:.3f} scores 0.5", markup=False)

    guarded(debug, run)


@index_app.command("train")
def index_train(
    name: Annotated[str, typer.Argument(help="A trainable index (bow, vlad, fisher...).")],
    paths: Annotated[Optional[list[str]], typer.Argument(help="Images to learn from; default: the index's own images.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Learn (again) what an index's extractor learns from the collection; re-encode its images."""

    def run() -> None:
        with progress_bar("re-encoding") as on_progress:
            report = _client().train(name, paths or [], on_progress=on_progress, on_status=say)
        if as_json:
            emit_json({"index": name, "reencoded": report.to_json()})
            return
        for failure in report.failed:
            say(f"kept the old vector: {failure.path}: {failure.error}")
        stdout.print(f"trained {name}; re-encoded {report.added} images, {len(report.failed)} kept their old vectors")

    guarded(debug, run)


@index_app.command("export")
def index_export(
    name: Annotated[str, typer.Argument(help="The index to export.")],
    file: Annotated[Path, typer.Argument(help="The file to write (a zip).")],
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Write an index to one file: its images' records, vectors, learned state and network."""

    def run() -> None:
        manifest = _client().export_index(name, file)
        emit_json({"index": name, "file": str(file), "images": manifest["images"]}) if as_json else stdout.print(
            f"exported {name}: {manifest['images']} images to {file}")

    guarded(debug, run)


@index_app.command("import")
def index_import(
    file: Annotated[Path, typer.Argument(help="A file written by `imgdb index export`.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Import under this name (default: its own).")] = None,
    originals: Annotated[Optional[Path], typer.Option(
        "--originals", help="A folder of this machine holding the images' files: imported paths inside it are served "
                            "(originals, thumbnails); any other path is kept as archive://PATH and never opened.")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Create an index from an export, in this database."""

    def run() -> None:
        manifest = _client().import_index(file, name, originals=originals)
        imported = manifest["index"]["name"]
        emit_json({"index": imported, "file": str(file), "images": manifest["images"]}) if as_json else stdout.print(
            f"imported {imported}: {manifest['images']} images from {file}")

    guarded(debug, run)


@index_app.command("list")
def index_list(as_json: Json = False, debug: Debug = False) -> None:
    """List indexes with their extractor, dimension, size and ANN method."""

    def run() -> None:
        infos = _client().indexes()
        if as_json:
            emit_json([info.to_json() for info in infos])
            return
        table = Table("name", "extractor", "dim", "storage", "images", "ann")
        for info in infos:
            table.add_row(info.name, info.extractor, str(info.dim), info.storage, str(info.images), str(info.ann))
        stdout.print(table)

    guarded(debug, run)


@index_app.command("drop")
def index_drop(name: str, as_json: Json = False, debug: Debug = False) -> None:
    """Delete an index and its vectors (the images stay)."""

    def run() -> None:
        _client().drop_index(name)
        emit_json({"dropped": name}) if as_json else stdout.print(f"dropped {name}")

    guarded(debug, run)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    keep_alive: Annotated[float, typer.Option("--keep-alive", min=1, help="Seconds an idle connection stays open.")] = 30,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.1, envvar="IMGDB_HEADER_TIMEOUT",
                                                  help="Seconds a connection has to send a request head.")] = 10,
    debug: Debug = False,
) -> None:
    """Serve the HTTP API (search by upload, URL or id) until stopped."""

    def run() -> None:
        _check_port(host, port)  # (before the model loads: a taken port is a one-line refusal, at once)
        import uvicorn

        from imgdb.web.app import MAX_HEAD_BYTES, create_app

        # uvicorn closes a connection idle for 5 s by default. Under load its timer can fire before
        # the busy event loop has read a request already sent on that connection, and the client
        # gets a reset instead of an answer (benchmarks/load.py: 15 resets in 4500 searches once
        # in three runs at 5 s, 13 in 3000 at 1 s). A client's pooled connections sit idle for
        # seconds between bursts, so a longer keep-alive makes the race rare.
        from imgdb.web.protocol import guarded_protocol

        uvicorn.run(create_app(), host=host, port=port, log_level="info", timeout_keep_alive=keep_alive,
                    http=guarded_protocol(header_timeout), h11_max_incomplete_event_size=MAX_HEAD_BYTES)

    guarded(debug, run)


def _check_port(host: str, port: int) -> None:
    """Refuse, with the reason, an address the server could not listen on (taken, not this machine's)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds it)
            probe.bind(address)
    except OSError as exc:
        taken = " (another server is there: give --port)" if exc.errno == errno.EADDRINUSE else ""
        raise imgdb.ImgdbError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{taken}") from None


@db_app.command("url")
def db_url(as_json: Json = False, debug: Debug = False) -> None:
    """Print the PostgreSQL URL imgdb uses (starting the embedded server if needed)."""

    def run() -> None:
        url = imgdb.database_url()
        emit_json({"url": url}) if as_json else print(url)

    guarded(debug, run)


@db_app.command("status")
def db_status(as_json: Json = False, debug: Debug = False) -> None:
    """Say which database imgdb uses and whether it is up."""

    def run() -> None:
        info = imgdb.database_status()
        emit_json(info) if as_json else stdout.print("\n".join(f"{k}: {v}" for k, v in info.items()), markup=False)

    guarded(debug, run)


@db_app.command("start")
def db_start(as_json: Json = False, debug: Debug = False) -> None:
    """Start the embedded server and migrate its schema."""

    def run() -> None:
        url = imgdb.database_url()
        emit_json({"running": True, "url": url}) if as_json else print(url)

    guarded(debug, run)


@db_app.command("stop")
def db_stop(as_json: Json = False, debug: Debug = False) -> None:
    """Stop the embedded server (cleanly; data is kept)."""

    def run() -> None:
        stopped = imgdb.stop_embedded()
        emit_json({"stopped": stopped}) if as_json else stdout.print("stopped" if stopped else "not running")

    guarded(debug, run)


@db_app.command("distribute")
def db_distribute(
    shards: Annotated[Optional[int], typer.Option("--shards", min=1, max=4096, help="Shards of the images and "
                                                  "vectors (default: the cluster's citus.shard_count).")] = None,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Distribute imgdb's tables over a Citus cluster (IMGDB_DATABASE_URL: its coordinator); run once."""

    def run() -> None:
        layout = _client().distribute(shards)
        if as_json:
            emit_json(layout)
            return
        stdout.print(f"distributed: {', '.join(layout['distributed'])} ({layout['shards']} shards); "
                     f"reference tables: {', '.join(layout['reference'])}", markup=False)
        for node in layout["nodes"]:
            stdout.print(f"  {node['node']}: {node['shards']} shards, {node['images']} images, "
                         f"{node['bytes'] / 2**20:.1f} MiB", markup=False)

    guarded(debug, run)


@db_app.command("grant")
def db_grant(
    role: Annotated[str, typer.Argument(help="An application role.")],
    revoke: Annotated[bool, typer.Option("--revoke", help="Take the access back instead.")] = False,
    as_json: Json = False, debug: Debug = False,
) -> None:
    """Give a role read access: SELECT on imgdb's views, EXECUTE on its SQL functions, nothing else."""

    def run() -> None:
        client = _client()
        client.revoke(role) if revoke else client.grant(role)
        emit_json({"role": role, "granted": not revoke}) if as_json else stdout.print(
            f"{'revoked' if revoke else 'granted'} read access {'from' if revoke else 'to'} {role}", markup=False)

    guarded(debug, run)


@db_app.command("upgrade")
def db_upgrade(as_json: Json = False, debug: Debug = False) -> None:
    """Apply pending schema migrations (installing pgvector and imgdb's schema where they are missing)."""

    def run() -> None:
        done = imgdb.upgrade_database()
        emit_json(done) if as_json else stdout.print(f"schema {done['schema']} at revision {done['revision']}",
                                                     markup=False)

    guarded(debug, run)
