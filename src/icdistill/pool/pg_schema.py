"""The PostgreSQL pool's tables, notification channels and clock: the schema every worker creates if
missing, and the names the pool, its claims and its ledger share."""

from __future__ import annotations

from typing import Literal

ClaimResult = Literal["claimed", "pooled", "busy", "budget"]

CHANNEL = "icd_pool"

# a claim deleted (its demo committed, or released): the item's image digest (or text claim key)
CLAIMS_CHANNEL = "icd_pool_claims"

# the database's clock in seconds since the epoch: leases compare times of many hosts
DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"

# how many times a count check that disagrees is retried after applying the notifications it brought
CHECK_ROUNDS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS icd_annotations (
    id BIGSERIAL PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    query_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_png BYTEA,
    image_ref TEXT,
    image_digest TEXT,
    prompt TEXT NOT NULL,
    options TEXT,
    answer TEXT NOT NULL,
    accepted BOOLEAN NOT NULL,
    in_pool BOOLEAN NOT NULL,
    status TEXT NOT NULL,
    teacher TEXT,
    samples TEXT,
    votes TEXT,
    agreement DOUBLE PRECISION,
    usage TEXT,
    seconds DOUBLE PRECISION,
    created DOUBLE PRECISION,
    worker TEXT
);
-- a pool made before owners: its query ids become the default owner's
ALTER TABLE icd_annotations ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
ALTER TABLE icd_annotations DROP CONSTRAINT IF EXISTS icd_annotations_query_id_key;
CREATE UNIQUE INDEX IF NOT EXISTS icd_one_query_per_owner ON icd_annotations (owner, query_id);
CREATE UNIQUE INDEX IF NOT EXISTS icd_one_demo_per_item
    ON icd_annotations (image_digest, prompt) WHERE in_pool AND image_digest IS NOT NULL;
CREATE INDEX IF NOT EXISTS icd_in_pool ON icd_annotations (id) WHERE in_pool;
CREATE TABLE IF NOT EXISTS icd_embeddings (
    demo_id BIGINT NOT NULL REFERENCES icd_annotations(id),
    key TEXT NOT NULL,
    vec BYTEA NOT NULL,
    PRIMARY KEY (demo_id, key)
);
CREATE TABLE IF NOT EXISTS icd_claims (
    image_digest TEXT NOT NULL,
    prompt TEXT NOT NULL,
    query_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (image_digest, prompt)
);
CREATE TABLE IF NOT EXISTS icd_ledger (
    name TEXT PRIMARY KEY,
    calls BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    max_calls BIGINT
);
-- the global dollar cap (a ledger made before it gets the columns)
ALTER TABLE icd_ledger ADD COLUMN IF NOT EXISTS max_cost_usd DOUBLE PRECISION;
ALTER TABLE icd_ledger ADD COLUMN IF NOT EXISTS dearest_call_usd DOUBLE PRECISION NOT NULL DEFAULT 0;
"""
