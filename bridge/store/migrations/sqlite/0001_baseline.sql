-- 0001 baseline: the schema of postback-bridge 0.1.0, the last release before versioned
-- migrations. Written so that it also brings a store of an earlier release up to it (IF NOT
-- EXISTS); the two columns such a store may lack are added just before, in code
-- (bridge/store/sqlite.py, `_before_versioning`), since SQLite has no ADD COLUMN IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    dedup_key TEXT NOT NULL UNIQUE,        -- CONTRACT §6: permanent, not a time window
    type TEXT NOT NULL,
    received_at REAL NOT NULL,
    body TEXT NOT NULL                     -- the normalized event as JSON
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL REFERENCES events (id),
    destination TEXT NOT NULL,
    route TEXT NOT NULL,
    conversation TEXT NOT NULL,
    status TEXT NOT NULL,                  -- pending | delivered | dead
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,              -- stored or last replayed: max_age counts from it
    next_at REAL NOT NULL,                 -- due time; while leased, when the lease runs out
    leased_by TEXT,
    last_error TEXT,
    updated_at REAL NOT NULL,
    ordered INTEGER NOT NULL DEFAULT 1,    -- 1: its destination sends a conversation in order
    came_in_at REAL                        -- the first created_at, once a replay has moved it
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, next_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_status ON deliveries (status, updated_at);
CREATE TABLE IF NOT EXISTS attempts (
    delivery_id INTEGER NOT NULL,
    number INTEGER NOT NULL,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,                 -- delivered | retry | dead
    status INTEGER,
    error TEXT,
    duration REAL NOT NULL,
    PRIMARY KEY (delivery_id, number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    destination TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (destination, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dropped (        -- events no route sends anywhere (`to: []`, no default):
    event_id TEXT PRIMARY KEY,              -- stored for their dedup key and id (a retry is a
    received_at REAL NOT NULL               -- duplicate), purged like delivered deliveries
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dropped_received ON dropped (received_at);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Only the deliveries of ordered destinations are in the index `claim_ordered` reads: texters'
-- numbers are random, so each entry is a write to a random page, paid on every postback; a
-- destination that sends in any order (webhooks, logs) has no use for it.
DROP INDEX IF EXISTS deliveries_conversation;
CREATE INDEX IF NOT EXISTS deliveries_ordered
    ON deliveries (destination, conversation, id) WHERE status = 'pending' AND ordered = 1;
