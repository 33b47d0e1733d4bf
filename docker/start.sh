#!/usr/bin/env bash
# Start-up of the imgdb container: wait for PostgreSQL, migrate, optionally ingest, then serve.
#
# The tests run this same script outside docker against the embedded database (no image can be
# pulled on CI), so what the container does at start-up is what CI checks.
#
#   IMGDB_DATABASE_URL      the server (compose points it at the pgvector service); unset: embedded
#   IMGDB_HOST, IMGDB_PORT  where to listen (default 0.0.0.0:8000, as a container should)
#   IMGDB_DB_WAIT           seconds to wait for the database to accept connections (default 60)
#   IMGDB_DISTRIBUTE_SHARDS on a Citus coordinator: distribute imgdb's tables over that many shards
#                           first (`imgdb db distribute`; once distributed, later starts change nothing)
#   IMGDB_INGEST_ON_START   paths (space-separated) to ingest before serving; content already
#                           stored is skipped by hash, so a restart only adds what is new
set -euo pipefail

host=${IMGDB_HOST:-0.0.0.0}
port=${IMGDB_PORT:-8000}
wait_s=${IMGDB_DB_WAIT:-60}

# compose starts both services together: the database may still be initialising. `imgdb db upgrade`
# fails with a one-line reason until it answers, and applies the schema once it does.
deadline=$((SECONDS + wait_s))
until error=$(imgdb db upgrade 2>&1 >/dev/null); do
  if (( SECONDS >= deadline )); then
    echo "imgdb-start: database not ready after ${wait_s}s: ${error#error: }" >&2
    exit 1
  fi
  sleep 1
done

if [[ -n "${IMGDB_DISTRIBUTE_SHARDS:-}" ]]; then
  imgdb db distribute --shards "${IMGDB_DISTRIBUTE_SHARDS}" >&2
fi

if [[ -n "${IMGDB_INGEST_ON_START:-}" ]]; then
  read -r -a paths <<< "${IMGDB_INGEST_ON_START}"
  echo "imgdb-start: ingesting ${paths[*]}" >&2
  imgdb ingest "${paths[@]}" >&2
fi

exec imgdb serve --host "$host" --port "$port"
