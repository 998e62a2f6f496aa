-- name: insert_event
INSERT INTO events (id, dedup_key, type, received_at, body) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (dedup_key) DO NOTHING

-- name: insert_delivery
INSERT INTO deliveries (event_id, destination, route, conversation, ordered, status, created_at, next_at, updated_at)
VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)

-- name: claim
UPDATE deliveries
SET next_at = :lease_until, leased_by = :owner, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM deliveries
    WHERE destination = :destination AND status = 'pending' AND next_at <= :now
    ORDER BY next_at, id
    LIMIT :limit
)
RETURNING id, event_id, attempts, created_at, conversation, route

-- name: claim_ordered
UPDATE deliveries
SET next_at = :lease_until, leased_by = :owner, attempts = attempts + 1
WHERE id IN (
    SELECT d.id FROM deliveries AS d
    WHERE d.destination = :destination AND d.status = 'pending' AND d.next_at <= :now
      AND NOT EXISTS (
          SELECT 1 FROM deliveries AS earlier
          WHERE earlier.destination = d.destination AND earlier.conversation = d.conversation
            AND earlier.status = 'pending' AND earlier.ordered = 1 AND earlier.id < d.id
      )
    ORDER BY d.next_at, d.id
    LIMIT :limit
)
RETURNING id, event_id, attempts, created_at, conversation, route

-- name: finish
-- Idempotent, and safe when late: a verdict from an attempt whose lease ran out (the delivery
-- has been claimed again since, so attempts moved on) is ignored, unless it is 'delivered':
-- the peer has the event, so the newer attempt's verdict no longer matters.
UPDATE deliveries
SET status = ?1, next_at = ?2, leased_by = NULL, last_error = ?3, updated_at = ?4, tracking_id = COALESCE(?7, tracking_id)
WHERE id = ?5 AND status = 'pending' AND (attempts = ?6 OR ?1 = 'delivered')

-- name: record_attempt
INSERT INTO attempts (delivery_id, number, at, outcome, status, error, duration)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (delivery_id, number) DO NOTHING

-- name: release
-- Only while the claim is still ours (our lease, same attempt number): once its lease ran out
-- the delivery may have been claimed again, and giving it back would send it twice.
UPDATE deliveries SET next_at = :now, leased_by = NULL, attempts = attempts - 1
WHERE id = :id AND attempts = :attempt AND status = 'pending' AND leased_by = :owner

-- name: expire
-- Pending deliveries past max_age that nobody is sending (not leased, or their lease ran out)
-- are dead; one being sent is left to its attempt's verdict, and one due within the grace
-- (:settled = now - grace) to its worker: a last retry is due at the deadline itself.
-- `attempts` counts claims. The index keeps the look to this destination's pending rows
-- (without statistics the planner would read every pending row of every destination, by
-- `deliveries_status`).
UPDATE deliveries INDEXED BY deliveries_due
SET status = 'dead', next_at = :now, leased_by = NULL, updated_at = :now,
    last_error = :reason || attempts || ' attempts' || COALESCE(': ' || last_error, '')
WHERE destination = :destination AND status = 'pending' AND created_at < :cutoff
  AND (leased_by IS NULL OR next_at <= :now) AND (next_at <= :settled OR next_at > :now)
RETURNING event_id, route, conversation

-- name: lease_owners
SELECT DISTINCT leased_by FROM deliveries WHERE status = 'pending' AND leased_by IS NOT NULL

-- name: recover_leases
UPDATE deliveries SET next_at = MIN(next_at, :now), leased_by = NULL
WHERE status = 'pending' AND leased_by = :owner

-- name: next_due
SELECT MIN(next_at) FROM deliveries WHERE destination = ? AND status = 'pending'

-- name: get_conversation
SELECT value FROM conversations WHERE destination = ? AND key = ?

-- name: put_conversation
INSERT INTO conversations (destination, key, value) VALUES (?, ?, ?)
ON CONFLICT (destination, key) DO UPDATE SET value = excluded.value

-- name: get_event
SELECT body FROM events WHERE id = ?

-- name: attempts
SELECT number, at, outcome, status, error, duration FROM attempts WHERE delivery_id = ? ORDER BY number

-- name: heartbeat
INSERT INTO meta (key, value) VALUES ('heartbeat', ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: stats
SELECT destination, status, COUNT(*), MIN(created_at) FROM deliveries
WHERE status IN ('pending', 'dead') GROUP BY destination, status

-- name: purge_deliveries
DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries
    WHERE (status = 'delivered' AND updated_at < :delivered_before)
       OR (status = 'dead' AND updated_at < :dead_before)
    LIMIT :batch
)
RETURNING id, event_id

-- name: insert_dropped
INSERT INTO dropped (event_id, received_at) VALUES (?, ?)

-- name: purge_dropped
DELETE FROM dropped WHERE event_id IN (
    SELECT event_id FROM dropped WHERE received_at < :delivered_before ORDER BY received_at LIMIT :batch
)
RETURNING event_id

-- name: purge_attempts
DELETE FROM attempts WHERE delivery_id = ?

-- name: purge_event
DELETE FROM events WHERE id = ? AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = ?)

-- name: deliveries_of_event
-- (created_at: when it came in, as in every listing; see CAME_IN_SQL)
SELECT id, event_id, destination, route, status, attempts, COALESCE(came_in_at, created_at), next_at, updated_at,
    last_error, tracking_id
FROM deliveries WHERE event_id = ? ORDER BY id

-- name: get_meta
SELECT value FROM meta WHERE key = ?

-- name: set_meta
INSERT INTO meta (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: record_optout
-- The texter's latest word to the short code: only a word said later replaces the one kept (a
-- retry of the same postback, or an older one arriving late, changes nothing).
INSERT INTO optouts (texter, short_code, opted_out, word, at, event_id) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (texter, short_code) DO UPDATE
SET opted_out = excluded.opted_out, word = excluded.word, at = excluded.at, event_id = excluded.event_id
WHERE excluded.at > optouts.at OR (excluded.at = optouts.at AND excluded.opted_out >= optouts.opted_out)

-- name: opted_out
SELECT opted_out FROM optouts WHERE texter = ? AND short_code = ?

-- name: conversation_of
SELECT key FROM conversations WHERE destination = ? AND value = ? ORDER BY key LIMIT 1

-- name: delivery_by_tracking_id
SELECT id, event_id, destination, route, status, attempts, COALESCE(came_in_at, created_at), next_at, updated_at,
    last_error, tracking_id
FROM deliveries WHERE tracking_id = ? ORDER BY id DESC LIMIT 1

-- name: update_event
UPDATE events SET body = ? WHERE id = ?

-- name: release_waiting
-- An event's deliveries that wait for its media step (due later, nobody sending them) are due now.
UPDATE deliveries SET next_at = ?1
WHERE event_id = ?2 AND destination <> ?3 AND status = 'pending' AND leased_by IS NULL AND next_at > ?4
RETURNING destination

-- name: keep_meta
INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING
-- name: postbacks_per_minute
-- (a range of the events_received index, which holds received_at: the table is not read)
SELECT CAST(received_at / 60 AS INTEGER) * 60 AS minute, COUNT(*) FROM events
WHERE received_at >= ? GROUP BY minute ORDER BY minute

-- name: recent_errors
-- The deliveries whose latest attempt failed (delivered ones have no last_error): the partial
-- index deliveries_errors, newest first.
SELECT id, event_id, destination, route, status, attempts, COALESCE(came_in_at, created_at), next_at, updated_at,
    last_error, tracking_id
FROM deliveries WHERE last_error IS NOT NULL ORDER BY updated_at DESC, id DESC LIMIT ?

-- name: index_text
-- The events waiting for the text index (events_text_pending) up to :last, into it; an event
-- purged meanwhile is gone from the join. OR REPLACE: a row left by a VACUUM's renumbering of
-- rowids must not stop the index. (MATERIALIZED: each text taken out of its JSON once. CROSS
-- JOIN: SQLite's way to say the waiting rows come first, one lookup of an event each; left to
-- itself it read every event.)
WITH waiting AS MATERIALIZED (
    SELECT e.rowid AS event_rowid, json_extract(e.body, '$.text') AS text, e.id AS event_id
    FROM events_text_pending AS p CROSS JOIN events AS e ON e.rowid = p.event_rowid
    WHERE p.event_rowid <= :last
)
INSERT OR REPLACE INTO events_text (rowid, text, event_id)
SELECT event_rowid, text, event_id FROM waiting WHERE text IS NOT NULL
