"""The command line as CONVENTIONS.md fixes it: one JSON document on stdout with --json, a one-line
reason and a non-zero exit on failure. Most commands run in-process (the model loads once); the
failure path runs as a real subprocess to see exactly what a user's terminal sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgdb_cli.main import app

runner = CliRunner()


def run_json(*args: str):  # noqa: ANN201
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr or result.output
    return json.loads(result.stdout)


def test_ingest_json_summary(sample_index: str, museum_sample: Path) -> None:
    summary = run_json("ingest", str(museum_sample / "images"), "--metadata", str(museum_sample / "metadata.json"))
    assert set(summary) == {"added", "duplicates", "failed", "seconds"}
    assert summary["added"] == 0 and summary["duplicates"] == 40 and summary["failed"] == []


def test_ingest_meta_pairs_and_bad_pairs(sample_index: str, museum: Path) -> None:
    summary = run_json("ingest", str(museum / "images" / "bbdd_00100.jpg"), "--meta", "room=3", "--meta", "floor=1")
    assert summary["added"] == 1
    hits = run_json("search", str(museum / "images" / "bbdd_00100.jpg"), "-k", "1", "--filter", "meta.room=3")
    assert hits[0]["metadata"] == {"room": "3", "floor": "1"}
    result = runner.invoke(app, ["ingest", str(museum / "images" / "bbdd_00100.jpg"), "--meta", "novalue"])
    assert result.exit_code == 1 and "expected KEY=VALUE" in result.stderr


def test_search_json_shape_and_filters(sample_ids: list[int]) -> None:
    hits = run_json("search", f"id:{sample_ids[5]}", "-k", "3")
    assert hits[0]["id"] == sample_ids[5] and hits[0]["distance"] < 1e-4
    assert all(set(h) == {"id", "uri", "distance", "metadata"} for h in hits)
    author = hits[0]["metadata"]["author"]
    filtered = run_json("search", f"id:{sample_ids[5]}", "-k", "50", "--filter", f"meta.author={author}")
    assert filtered and all(h["metadata"]["author"] == author for h in filtered)


def test_embed_prints_a_literal_plain_sql_accepts(client, sample_ids: list[int]) -> None:  # noqa: ANN001
    document = run_json("embed", f"id:{sample_ids[7]}")
    assert document["dim"] == len(document["vector"]) == client.index().dim and document["index"] == "default"
    literal = runner.invoke(app, ["embed", f"id:{sample_ids[7]}"]).stdout.strip()
    assert literal.startswith("[") and literal.endswith("]")
    with client.database.connect() as conn:
        nearest = conn.exec_driver_sql(
            f"SELECT id FROM images_default ORDER BY embedding <-> '{literal}' LIMIT 1"
        ).scalar_one()
    assert nearest == sample_ids[7]


def test_index_list_extractors_and_create(sample_index: str) -> None:
    listing = run_json("index", "list")
    default = next(i for i in listing if i["name"] == "default")
    assert {"name", "extractor", "dim", "images", "ann"} <= set(default) and default["images"] >= 40
    assert default["ann"] == "hnsw" and default["ann_params"]["ef_search"] == 40 and default["storage"] == "vector"
    families = run_json("extractors")
    assert all({"family", "spec", "description"} <= set(f) for f in families)
    created = run_json("index", "create", "cli_made", "--extractor", "color:hsv/bins=6x6x6", "--ann", "ivfflat")
    assert created == {"name": "cli_made", "extractor": "color:hsv/bins=6x6x6/size=256", "dim": 216, "images": 0,
                       "ann": "ivfflat", "ann_params": {"lists": 0, "probes": 10}, "storage": "vector", "local": None}
    result = runner.invoke(app, ["index", "create", "cli_made", "--extractor", "color"])
    assert result.exit_code == 1 and "exists already" in result.stderr


def test_delete_json(museum: Path, tmp_path: Path) -> None:
    run_json("index", "create", "cli_delete", "--extractor", "color:hsv")
    run_json("ingest", str(museum / "images" / "bbdd_00150.jpg"), "--index", "cli_delete")
    image_id = run_json("search", str(museum / "images" / "bbdd_00150.jpg"), "--index", "cli_delete", "-k", "1")[0]["id"]
    assert run_json("delete", str(image_id)) == {"deleted": 1}


def test_eval_json_with_per_query(museum_sample: Path) -> None:
    run_json("index", "create", "cli_eval", "--extractor", "color:hsv")
    report = run_json("eval", str(museum_sample), "--index", "cli_eval", "--per-query")
    assert {"mAP", "recall@1", "recall@10", "all@1", "all@10", "queries", "index", "extractor", "per_query"} <= set(report)
    assert report["queries"] == len(report["per_query"]) == len(json.loads((museum_sample / "queries.json").read_text()))


def test_db_status_json(imgdb_home: Path, sample_index: str) -> None:
    status = run_json("db", "status")
    assert status["embedded"] is True and status["running"] is True
    assert status["pgdata"] == str(imgdb_home / "pgdata")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["search", "/no/such/photo.jpg"], "No such file or directory"),
        (["search", "http://127.0.0.1/x.jpg"], "loopback"),
        (["search", "id:1", "--filter", "nonsense"], "cannot parse filter"),
        (["index", "create", "Bad-Name"], "bad index name"),
    ],
)
def test_failures_are_one_line_without_traceback(imgdb_home: Path, sample_index: str, args: list[str], reason: str) -> None:
    imgdb = str(Path(sys.executable).parent / "imgdb")
    env = {**os.environ, "IMGDB_HOME": str(imgdb_home)}
    result = subprocess.run([imgdb, *args, "--json"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr
    debug = subprocess.run([imgdb, *args, "--debug"], env=env, capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_training_progress_on_a_terminal_is_one_display_with_the_loss_and_time_left(monkeypatch) -> None:  # noqa: ANN001
    import io

    from rich.console import Console

    import imgdb_cli.output as output

    monkeypatch.setattr(output, "stderr", Console(file=io.StringIO(), force_terminal=True, width=120))
    with output.training_bars() as (on_progress, on_epoch):
        on_progress(287, 287)
        on_epoch(2, 5, 0.0123, 150.0)
    shown = output.stderr.file.getvalue()
    assert "preparing" in shown and "training" in shown and "loss 0.0123, about 2 min 30 s left" in shown


def test_a_newcomers_first_commands_say_what_they_do(imgdb_home: Path, sample_index: str, museum_sample: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A taken port is refused in one line before the model loads; in 80 columns (or a pipe) each hit
    keeps to two lines with its whole file name; an evaluation says which ranking it scored."""
    import socket
    import time

    import imgdb_cli.output as output

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([str(Path(sys.executable).parent / "imgdb"), "serve", "--port", str(port)],
                                env={**os.environ, "IMGDB_HOME": str(imgdb_home)}, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "give --port" in result.stderr
    assert time.monotonic() - started < 30

    monkeypatch.setattr(output.stdout, "width", 80)
    photo = sorted((museum_sample / "images").glob("*.jpg"))[3]
    found = CliRunner().invoke(app, ["search", str(photo), "-k", "4"])
    assert found.exit_code == 0, found.output
    lines = found.stdout.splitlines()
    # (Its whole path: the sample's, or the museum's where another test stored those bytes first.)
    assert len(lines) == 8 and lines[0].startswith(" 1. id ") and lines[0].endswith(f"/images/{photo.name}"), found.stdout
    assert all(line.startswith("    {") and len(line) <= 80 for line in lines[1::2]), found.stdout

    run_json("index", "create", "cli_ranked", "--extractor", "color:hsv")
    evaluated = CliRunner().invoke(app, ["eval", str(museum_sample), "--index", "cli_ranked", "--rerank", "none"])
    assert "ranked by none: mAP" in evaluated.stdout, evaluated.stdout


def test_the_first_progress_line_counts_from_the_start_of_the_job(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import time

    import imgdb_cli.output as output

    monkeypatch.setattr(output, "LOG_EVERY_S", 0.0)
    with output.progress_bar("testing") as update:
        time.sleep(1.2)
        update(50, 100)
    line = capsys.readouterr().err.splitlines()[0]
    rate = float(line.split(", ")[1].removesuffix("/s"))
    assert line.startswith("testing: 50/100 (50%)") and 20 < rate < 50, line
