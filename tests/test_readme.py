"""The README's code, run the way typer and SQLModel test their docs: every fenced block is marked,
just before it, as ``<!-- example: NAME -->`` (run here, in order, or by the test file that names
it) or ``<!-- not runnable: REASON -->``, and every example runs twice: against a real embedded
PostgreSQL, and against a Citus coordinator with two workers (:mod:`tests.citus`) whose imgdb tables
were distributed first, with the same blocks and the same checks.

The blocks run in a sandbox that stands in for a reader's machine: a working folder with
``photo.jpg`` and friends, ``../shared/datasets/museum`` (the museum sample, so that the commands
take seconds), the shop's ``photos`` table under a media folder, and an image server. The README
writes what a reader has in placeholders; :func:`placeholders` says what each stands for here, and
nothing else of a block is changed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from tests.conftest import ROOT, copy_image, database_url, tool_env

MARKER = re.compile(r"^<!-- (example|not runnable): (.+?) -->$")
#: Markers the project's tooling reads (the set-up commands), with what runs their block.
TOOLING = {"main-command": "the main job's command: run here too, as the example `main-command`",
           "test-command": "the test command: `.ci/run` runs it, and it runs this file"}
#: Examples another test file runs (with the database it needs), by name.
RUN_ELSEWHERE = {"orm-join": "tests/test_application.py"}
#: Examples for a Citus coordinator: elsewhere they must be refused with the reason.
CITUS_ONLY = {"cluster-distribute"}
#: Where each SQL example runs: the shop's database as its administrator or as the application's
#: role, or the database of the README's first part (the embedded one it stands for) as its owner.
SQL_RUNS_AS = {"admin-setup": "shop administrator", "sql-view": "owner", "shop-sql": "shop_app",
               "duplicates-sql": "owner"}


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str
    kind: str  # "example", "not runnable", or a tooling marker
    label: str  # the example's name, or why it is not run

    @property
    def name(self) -> str:
        return self.label if self.kind == "example" else f"line {self.line}"


def readme_blocks() -> list[Block]:
    """Every fenced block of the README with the marker on the line before it."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start, language = i, lines[i][3:].strip()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = lines[start - 1].strip() if start else ""
        found = MARKER.match(marker)
        tooling = marker[5:-4] if marker.startswith("<!-- ") and marker[5:-4] in TOOLING else None
        kind, label = (found.group(1), found.group(2)) if found else ((tooling, TOOLING[tooling]) if tooling else ("", ""))
        if kind == "main-command":  # (run as an example as well)
            kind, label = "example", "main-command"
        blocks.append(Block(start + 1, language, "\n".join(lines[start + 1:end]) + "\n", kind, label))
        i = end + 1
    return blocks


def test_every_block_is_run_or_says_why_not() -> None:
    blocks = readme_blocks()
    unmarked = [b.line for b in blocks if not b.kind]
    assert not unmarked, f"README blocks at lines {unmarked} need <!-- example: NAME --> or <!-- not runnable: WHY -->"
    names = [b.label for b in blocks if b.kind == "example"]
    assert len(names) == len(set(names)), names
    assert all(len(b.label) > 15 for b in blocks if b.kind == "not runnable"), "say why, in a sentence"
    for name, where in RUN_ELSEWHERE.items():
        assert name in names and f"<!-- example: {name} -->" in (ROOT / where).read_text(), (name, where)
    assert {b.language for b in blocks if b.kind == "example"} <= {"sh", "python", "sql"}
    assert set(SQL_RUNS_AS) == {b.label for b in blocks if b.kind == "example" and b.language == "sql"}


@dataclass
class Sandbox:
    place: str
    work: Path
    env: dict[str, str]
    #: Placeholder in the README → what it stands for here.
    placeholders: dict[str, str]
    main_url: str
    shop_url: str
    #: The shop's database as imgdb's own role.
    shop_as_imgdb: str


#: Where the README's databases live: the embedded server, or a Citus cluster where imgdb's tables
#: are distributed (``imgdb db distribute``) before the examples run, unchanged.
PLACES = ("one node", "citus")


@pytest.fixture(scope="module", params=PLACES)
def sandbox(request: pytest.FixtureRequest, client, new_database, museum_sample: Path, museum: Path,  # noqa: ANN001
            http_root, tmp_path_factory: pytest.TempPathFactory) -> Sandbox:  # noqa: ANN001
    place = request.param
    make_database = request.getfixturevalue("cluster").new_database if place == "citus" else new_database
    root = tmp_path_factory.mktemp("reader")
    work, media = root / "work", root / "media"
    (root / "shared" / "datasets").mkdir(parents=True)
    (root / "shared" / "datasets" / "museum").symlink_to(museum_sample)
    gallery = sorted((museum / "images").glob("*.jpg"))
    photo = sorted((museum / "queries").glob("*.jpg"))[0]
    for name in ("photo.jpg", "query.jpg", "upload.jpg"):
        copy_image(photo, work / name)
    for path in gallery[100:106]:
        copy_image(path, work / "photos" / path.name)
    base, served = http_root
    copy_image(photo, served / "photo.jpg")
    # An application's photos table (ids 40 to 47, alice's and bob's) with paths under the media
    # folder: in the database of the README's first part, and in the shop's, with the shop's role.
    for n, path in enumerate(gallery[120:128], start=40):
        copy_image(path, media / "a" / f"{n}.jpg")
    copy_image(media / "a" / "42.jpg", work / "upload.jpg")  # (the shop's search looks for photo 42)
    main_url, shop_admin = make_database("readme_main"), make_database("readme_shop", vector=False)
    shop_as_imgdb = database_url(shop_admin, "readme_shop", user="imgdb:...")  # (the README's role and password)
    for url in (main_url, shop_admin):
        with psycopg.connect(url, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'shop_app'").fetchone():
                conn.execute("CREATE ROLE shop_app LOGIN")
            conn.execute("CREATE TABLE photos (id integer PRIMARY KEY, path text, owner text)")
            for n in range(40, 48):
                conn.execute("INSERT INTO photos VALUES (%s, %s, %s)", (n, f"a/{n}.jpg", "alice" if n % 2 else "bob"))
            conn.execute("GRANT SELECT ON photos TO shop_app")
    placeholders = {
        # The set-up command's install: done already by the environment the tests run in.
        "python3 -m venv .venv && .venv/bin/pip install -e . && ": "",
        ".venv/bin/imgdb": "imgdb",
        # The shop's database server, and its media folder.
        "postgresql://imgdb:...@db.internal/shop": shop_as_imgdb,
        "/srv/media": str(media),
        # A web server with the photo (the guarded fetcher is told to allow loopback for it).
        "https://example.org/": f"{base}/",
        # A service that runs until stopped: stopped after a few seconds, as SIGTERM stops it.
        "imgdb sync --watch": "timeout --preserve-status -s TERM 8 imgdb sync --watch",
    }
    env = tool_env(IMGDB_DATABASE_URL=main_url, IMGDB_ALLOW_PRIVATE_URLS="1", PYTHONPATH=str(ROOT))
    sandbox = Sandbox(place, work, env, placeholders, main_url, shop_admin, shop_as_imgdb)
    if place == "citus":
        _run(["imgdb", "db", "distribute"], sandbox)
    return sandbox


def _filled(block: Block, sandbox: Sandbox) -> str:
    code = block.code
    for placeholder, value in sandbox.placeholders.items():
        code = code.replace(placeholder, value)
    if block.label == "sql-view":  # the descriptor `imgdb embed photo.jpg` prints
        code = code.replace("'[0.0123,...]'", f"'{_run(['imgdb', 'embed', 'photo.jpg'], sandbox).strip()}'")
    return code


def _run(command: list[str], sandbox: Sandbox, **env: str) -> str:
    done = subprocess.run(command, cwd=sandbox.work, env={**sandbox.env, **env}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{command[:2]}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


EXAMPLES = [b for b in readme_blocks() if b.kind == "example" and b.label not in RUN_ELSEWHERE]


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.name for b in EXAMPLES])
def test_the_readme_example_runs(block: Block, sandbox: Sandbox) -> None:
    """Each example, in the README's order (later ones build on earlier ones, as for a reader)."""
    code = _filled(block, sandbox)
    if sandbox.place == "citus" and block.label == "shop-attach":  # (once the administrator made imgdb's role)
        _run(["imgdb", "db", "distribute"], sandbox, IMGDB_DATABASE_URL=sandbox.shop_as_imgdb)
    if block.label in CITUS_ONLY and sandbox.place != "citus":
        refused = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=sandbox.work, env=sandbox.env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and "no Citus" in refused.stderr, refused.stderr  # (and says why)
        return
    if block.language == "sh":
        out = _run(["bash", "-euo", "pipefail", "-c", code], sandbox)
        # What a reader exports stays set for the next blocks, as in their shell.
        sandbox.env.update(re.findall(r"^export (\w+)=(\S+)$", code, re.MULTILINE))
    elif block.language == "python":
        out = _run([sys.executable, "-c", code], sandbox)
    else:
        url = {"shop administrator": sandbox.shop_url, "owner": sandbox.main_url,
               "shop_app": _shop_url(sandbox, "shop_app")}[SQL_RUNS_AS[block.label]]
        results = []
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(code)  # (no parameters: several statements go as one simple query)
            while True:
                if cursor.description:
                    results.append(cursor.fetchall())
                if not cursor.nextset():
                    break
        out = json.dumps(results, default=str)
    _check(block, out, sandbox)


def _shop_url(sandbox: Sandbox, role: str) -> str:
    return database_url(sandbox.shop_url, "readme_shop", user=role)


def _check(block: Block, out: str, sandbox: Sandbox) -> None:
    """What some examples say they print, checked."""
    if block.label == "main-command":
        assert "bbdd_" in out  # (a table of hits: the museum's paintings)
    if block.label == "cluster-distribute":
        distributed = re.search(r"distributed: ([^\n(]*)", out)
        assert distributed and {"image_hashes", "images"} <= {t.strip() for t in distributed.group(1).split(",")}
        assert "shards" in out
    if block.label == "shop-search":
        hits = json.loads(out)
        assert hits[0]["table"] == "photos" and hits[0]["ref"] == 42 and hits[0]["distance"] < 1e-5
    if block.label == "python-api":
        assert (sandbox.work / "why.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (sandbox.work / "tuned.zip").is_file()
    if block.label == "duplicates":
        assert '"groups": [' in out and '"level": "exact"' not in out  # (--level near: near groups only)
    if block.label == "sql-view":
        [rows] = json.loads(out)
        assert rows and len(rows) <= 10  # (the sample has paintings of the author it names)
    if block.label == "shop-sql":
        alike, similar = json.loads(out)
        assert alike and all(row[2] == "alice" and row[0] != 42 for row in alike)
        assert similar and 42 not in [row[0] for row in similar]
        assert np.all(np.diff([row[-1] for row in similar]) >= 0)
