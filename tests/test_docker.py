"""The deployment: docker/start.sh (the container's start-up, run here outside docker against the
embedded database, since no image can be pulled on CI) and the compose file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, SAMPLE_SIZE, LiveServer, started_like_the_container, tool_env

COMPOSE = ROOT / "docker" / "compose.yaml"


def test_start_script_migrates_ingests_and_serves(live_server: LiveServer, museum_sample: Path) -> None:
    log = live_server.output()
    # Everything IMGDB_INGEST_ON_START names is in the index already: a restart adds nothing.
    assert "imgdb-start: ingesting" in log and "added 0, duplicates 40, failed 0" in log, log[-2000:]
    query = json.loads((museum_sample / "queries.json").read_text())[1]
    photo = museum_sample / query["query"]
    answer = httpx.post(f"{live_server.url}/search", params={"k": 3}, timeout=60,
                        files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    hits = answer.json()
    assert Path(hits[0]["uri"]).name == Path(query["relevant"][0]).name
    assert hits[0]["thumbnail"].startswith("/images/")  # relative: never built from the Host header
    thumbnail = httpx.get(live_server.url + hits[0]["thumbnail"], timeout=30)
    assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff"


def test_start_script_gives_up_on_a_database_that_never_answers(tmp_path: Path) -> None:
    env = tool_env(IMGDB_DATABASE_URL="postgresql://imgdb@127.0.0.1:1/imgdb", IMGDB_DB_WAIT="3",
                   IMGDB_HOME=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "docker" / "start.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("imgdb-start: database not ready after 3s: cannot connect to PostgreSQL") and "refused" in line


def _compose() -> list[str]:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever this machine has."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no docker compose client on this machine (`apt-get install docker-compose` brings one)")


def _services(compose_file: Path, **env: str) -> dict:
    """The services of ``compose_file`` as `docker compose config` resolves them with ``env``."""
    done = subprocess.run([*_compose(), "-f", str(compose_file), "config"], env=tool_env(**env), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def _copied(dockerfile: str) -> list[list[str]]:
    """The sources of each ``COPY`` line of a Dockerfile (relative to its build context)."""
    return [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]


def test_compose_file_is_valid_and_wires_imgdb_to_postgres(tmp_path: Path) -> None:
    services = _services(COMPOSE, IMGDB_IMAGES=str(tmp_path), POSTGRES_PASSWORD="s3cret", IMGDB_API_TOKEN="t0ken")
    assert services["db"]["image"] == "pgvector/pgvector:pg18"
    app = services["imgdb"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert app["environment"]["IMGDB_DATABASE_URL"] == "postgresql://imgdb:s3cret@db:5432/imgdb"
    assert app["environment"]["IMGDB_API_TOKEN"] == "t0ken" and app["environment"]["IMGDB_SCHEMA"] == "imgdb"
    # The sync worker: same database and schema, started once imgdb has migrated it.
    worker = services["sync"]
    assert worker["entrypoint"] == ["imgdb", "sync", "--watch"]
    assert worker["depends_on"]["imgdb"]["condition"] == "service_healthy"
    assert {k: worker["environment"][k] for k in ("IMGDB_DATABASE_URL", "IMGDB_SCHEMA")} == {
        k: app["environment"][k] for k in ("IMGDB_DATABASE_URL", "IMGDB_SCHEMA")}
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    # v1 prints volumes as "source:target:mode", v2 as mappings.
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}:{'ro' if v.get('read_only') else 'rw'}"
              for v in app["volumes"]]
    assert f"{tmp_path}:/images:ro" in mounts
    # What the Dockerfile copies must exist, and its start-up is the script the test above runs.
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for sources in _copied(dockerfile):
        assert all((ROOT / source).exists() for source in sources), sources
    assert 'ENTRYPOINT ["imgdb-start"]' in dockerfile and "docker/start.sh /usr/local/bin/imgdb-start" in dockerfile


COMPOSE_CITUS = ROOT / "docker" / "compose.citus.yaml"


def test_citus_compose_file_builds_three_nodes_joins_them_and_distributes(tmp_path: Path) -> None:
    services = _services(COMPOSE_CITUS, IMGDB_IMAGES=str(tmp_path), POSTGRES_PASSWORD="s3cret", IMGDB_SHARDS="16")
    nodes = ("coordinator", "worker1", "worker2")
    for name in nodes:
        assert Path(services[name]["build"]["context"]) == ROOT / "docker" / "citus"
        assert services[name]["environment"]["POSTGRES_DB"] == "imgdb" and "ports" not in services[name]
    node_image = (ROOT / "docker" / "citus" / "Dockerfile").read_text()
    assert node_image.startswith("# ") and "FROM pgvector/pgvector:pg18" in node_image
    assert "shared_preload_libraries = 'citus'" in node_image and "postgresql-18-citus-" in node_image
    for sources in _copied(node_image):
        assert all((ROOT / "docker" / "citus" / source).is_file() for source in sources), sources
    # The workers join the coordinator once all three answer; imgdb starts after that, and distributes.
    joining = services["cluster"]
    assert {name: joining["depends_on"][name]["condition"] for name in nodes} == dict.fromkeys(nodes, "service_healthy")
    assert joining["entrypoint"][-1] == "/add-workers.sql"
    added = (ROOT / "docker" / "citus" / "add-workers.sql").read_text()
    assert all(f"citus_add_node('{worker}', 5432)" in added for worker in nodes[1:])
    app = services["imgdb"]
    assert app["depends_on"]["cluster"]["condition"] == "service_completed_successfully"
    assert app["environment"]["IMGDB_DATABASE_URL"] == "postgresql://imgdb:s3cret@coordinator:5432/imgdb"
    assert app["environment"]["IMGDB_DISTRIBUTE_SHARDS"] == "16"


def test_start_script_distributes_on_a_citus_coordinator(cluster, museum_sample: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """The container's start-up with IMGDB_DISTRIBUTE_SHARDS, against the tests' Citus cluster."""
    url = cluster.new_database("docker_start")
    with started_like_the_container(tmp_path, IMGDB_DATABASE_URL=url, IMGDB_DISTRIBUTE_SHARDS="4",
                                    IMGDB_INGEST_ON_START=str(museum_sample / "images")) as server:
        distributed = re.search(r"distributed: ([^\n(]*)", server.output())
        assert distributed and {"image_hashes", "images"} <= {t.strip() for t in distributed.group(1).split(",")}
        photo = sorted((museum_sample / "images").glob("*.jpg"))[2]
        answer = httpx.post(f"{server.url}/search", params={"k": 1}, timeout=60,
                            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200 and answer.json()[0]["uri"] == str(photo), answer.text
    status = subprocess.run(["imgdb", "db", "status", "--json"], env=tool_env(IMGDB_DATABASE_URL=url),
                            capture_output=True, text=True, timeout=120)
    layout = json.loads(status.stdout)["cluster"]
    assert layout["shards"] == 4 and sum(node["images"] for node in layout["nodes"]) == SAMPLE_SIZE
