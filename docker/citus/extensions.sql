-- Every node: Citus and pgvector in imgdb's database (POSTGRES_DB).
CREATE EXTENSION IF NOT EXISTS citus;
CREATE EXTENSION IF NOT EXISTS vector;
