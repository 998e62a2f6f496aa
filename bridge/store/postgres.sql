-- name: schema_lock
SELECT pg_advisory_xact_lock(hashtextextended('postback-bridge schema', 0))

-- name: event_by_dedup_key
SELECT id FROM events WHERE dedup_key = $1

-- name: events_by_dedup_key
SELECT dedup_key, id FROM events WHERE dedup_key = ANY($1::text[])

-- name: ingest_batch
-- Every postback of a group commit in one statement (one round trip, one transaction of its
-- own): the events, each new one's deliveries in the order the postbacks came (their ids are
-- drawn in that order), and the dropped ones. A dedup key that is taken, by a stored event or by
-- an earlier postback of this batch, skips its row (DO NOTHING); only the events RETURNED here
-- are new, and only their deliveries are inserted. Rows go in dedup key order, so two batches
-- holding the same two keys (the same postbacks at two instances at once) wait for each other in
-- one order, not a cycle. No NOTIFY here: see `notify`.
-- `locked` first ($19: the keys of the (destination, conversation) pairs of the batch's ordered
-- deliveries): ingests that add deliveries to the same conversation of an ordered destination
-- take turns, so within a conversation delivery ids are committed in id order. Without it, an
-- ingest that drew id 10 but committed after another that drew id 11 would let a claimer see 11
-- as the oldest pending delivery of its conversation and send it before 10. The events' insert
-- reads `locked` (an InitPlan, run before its first row), and the deliveries' insert reads the
-- events', so no id is drawn before every lock is held; they are held until the commit. Keys are
-- locked in sorted order, so two ingests never wait on each other in a cycle; a hash collision
-- only makes two unrelated conversations take turns. Nothing here reads what another ingest
-- commits while we wait (under READ COMMITTED, the default, ON CONFLICT sees it whatever the
-- snapshot), so the statement's snapshot, taken before the wait, is no matter.
WITH locked AS (
    SELECT count(*) AS n FROM (
        SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT unnest($19::bigint[]) AS k) AS keys ORDER BY k
    ) AS taken
), new AS (
    INSERT INTO events (id, dedup_key, type, received_at, body, sender, recipient, keyword, text)
    SELECT e.id, e.dedup_key, e.type, e.received_at, e.body, e.sender, e.recipient, e.keyword, e.text
    FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])
        WITH ORDINALITY AS e (id, dedup_key, type, received_at, body, sender, recipient, keyword, text, n)
    WHERE (SELECT n FROM locked) >= 0
    ORDER BY e.dedup_key, e.n
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id
), queued AS (
    INSERT INTO deliveries (event_id, destination, route, conversation, ordered, status, created_at, next_at, updated_at)
    SELECT d.event_id, d.destination, d.route, d.conversation, d.ordered, 'pending', d.at, d.at + d.delay, d.at
    FROM unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::boolean[], $15::float8[], $18::float8[])
        WITH ORDINALITY AS d (event_id, destination, route, conversation, ordered, at, delay, n)
    WHERE d.event_id IN (SELECT id FROM new)
    ORDER BY d.n
), kept AS (
    INSERT INTO dropped (event_id, received_at)
    SELECT x.event_id, x.at FROM unnest($16::text[], $17::float8[]) AS x (event_id, at)
    WHERE x.event_id IN (SELECT id FROM new)
)
SELECT id FROM new

-- name: listeners
-- Run by each instance's LISTEN connection, and by nothing else, with the channel appended as a
-- comment: another backend whose statement has this very text is another instance listening on
-- the same channel. `seen`: our own backend shows its statement (track_activities is on);
-- `others` also counts statements hidden from us (another role's), which may be one.
SELECT count(*) FILTER (
           WHERE pid <> pg_backend_pid() AND (query = current_query() OR query = '<insufficient privilege>')
       ),
       coalesce(bool_or(pid = pg_backend_pid() AND query = current_query()), false)
FROM pg_stat_activity
WHERE datname = current_database()

-- name: notify
-- Wakes the other instances' delivery loops for these destinations ($2: their names, or '*' for
-- every destination). A statement of its own after the postbacks' commit, on a connection whose
-- commits do not wait for the flush: PostgreSQL serializes the commits of every transaction that
-- notifies (one lock for the whole server), and a NOTIFY in the postbacks' own commit held that
-- lock through their flush, so their commits (and any other notifier's) took turns.
SELECT pg_notify($1, $2)

-- name: current_schema
SELECT current_database() || '.' || current_schema()

-- name: insert_deliveries
INSERT INTO deliveries (event_id, destination, route, conversation, ordered, status, created_at, next_at, updated_at)
SELECT $1, d.destination, d.route, d.conversation, d.ordered, 'pending', $6, $6, $6
FROM unnest($2::text[], $3::text[], $4::text[], $5::boolean[])
    WITH ORDINALITY AS d (destination, route, conversation, ordered, n)
ORDER BY d.n

-- name: claim
-- FOR UPDATE SKIP LOCKED: a row another instance is claiming right now is passed over, not
-- waited for, and the lock is rechecked against the row's newest version (a delivery claimed
-- and committed by another instance meanwhile has a lease in the future: no longer due).
WITH due AS (
    SELECT id FROM deliveries
    WHERE destination = $1 AND status = 'pending' AND next_at <= $2
    ORDER BY next_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries AS d
SET next_at = $4, leased_by = $5, attempts = d.attempts + 1
FROM due, events AS e
WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.event_id, d.attempts, d.created_at, d.conversation, d.route, e.body

-- name: claim_ordered
-- Only the oldest pending delivery of each conversation is due. A claimed delivery stays
-- 'pending' (leased, next_at in the future) until its verdict is recorded, so it keeps blocking
-- the rest of its conversation for every instance: the NOT EXISTS sees it in any snapshot taken
-- after the claim committed, and a claim running concurrently with ours either skips the row
-- we hold (SKIP LOCKED) or, once we committed, finds its lease in the future on recheck. The
-- lease row itself is the lock, across connections and instances, for as long as the attempt
-- runs; an advisory lock would have to be held on one connection for the whole attempt. Ids
-- within a conversation commit in order (the locks of ingest_batch), so no later delivery can be seen
-- as the oldest before an earlier one is visible.
WITH due AS (
    SELECT d.id FROM deliveries AS d
    WHERE d.destination = $1 AND d.status = 'pending' AND d.next_at <= $2
      AND NOT EXISTS (
          SELECT 1 FROM deliveries AS earlier
          WHERE earlier.destination = d.destination AND earlier.conversation = d.conversation
            AND earlier.status = 'pending' AND earlier.ordered AND earlier.id < d.id
      )
    ORDER BY d.next_at, d.id
    LIMIT $3
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE deliveries AS d
SET next_at = $4, leased_by = $5, attempts = d.attempts + 1
FROM due, events AS e
WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.event_id, d.attempts, d.created_at, d.conversation, d.route, e.body

-- name: complete
-- Attempts and their verdicts in one statement (one round trip, one commit), with the follow-up
-- deliveries of the verdicts that apply ($13: the delivery each follows up, in the order they are
-- added; a data-modifying WITH runs whether or not the query reads it). Returns the deliveries
-- this made dead, so each death is counted once. A verdict is idempotent, and safe when late: a
-- verdict from an attempt whose lease ran out (the delivery has been claimed again since, so
-- attempts moved on) is ignored, unless it is 'delivered': the peer has the event, so the newer
-- attempt's verdict no longer matters. No delivery may be in it twice (an UPDATE applies one of
-- two source rows, not both in turn): the caller makes one statement per round of those.
WITH recorded AS (
    INSERT INTO attempts (delivery_id, number, at, outcome, status, error, duration)
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::float8[], $4::text[], $5::integer[], $6::text[], $7::float8[])
    ON CONFLICT (delivery_id, number) DO NOTHING
), finished AS (
    UPDATE deliveries AS d
    SET status = f.status, next_at = f.next_at, leased_by = NULL, last_error = f.error, updated_at = $11,
        tracking_id = coalesce(f.tracking_id, d.tracking_id)
    FROM unnest($1::bigint[], $2::integer[], $8::text[], $9::float8[], $10::text[], $12::text[])
        AS f (id, attempt, status, next_at, error, tracking_id)
    WHERE d.id = f.id AND d.status = 'pending' AND (d.attempts = f.attempt OR f.status = 'delivered')
    RETURNING d.id, d.event_id, f.status
), followed AS (
    INSERT INTO deliveries (event_id, destination, route, conversation, ordered, status, created_at, next_at, updated_at)
    SELECT finished.event_id, u.destination, u.route, u.conversation, u.ordered, 'pending', $11, $11, $11
    FROM unnest($13::bigint[], $14::text[], $15::text[], $16::text[], $17::boolean[])
        WITH ORDINALITY AS u (of, destination, route, conversation, ordered, n)
    JOIN finished ON finished.id = u.of
    ORDER BY u.n
)
SELECT id FROM finished WHERE status = 'dead'

-- name: release
-- Only while the claim is still ours (our lease, same attempt number): once our lease ran out
-- another instance may hold the delivery, and giving it back would send it twice.
UPDATE deliveries SET next_at = $3, leased_by = NULL, attempts = attempts - 1
WHERE id = $1 AND attempts = $2 AND status = 'pending' AND leased_by = $4

-- name: expire
-- Pending deliveries past max_age that nobody is sending (not leased, or their lease ran out)
-- are dead; one being sent is left to its attempt's verdict, and one due within the grace
-- ($5 = now - grace) to its worker: a last retry is due at the deadline itself. `attempts`
-- counts claims. Rows another instance is claiming right now are skipped (they are leased once
-- it commits), and each locked row is rechecked against its newest version, as in `claim`.
WITH old AS (
    SELECT id FROM deliveries
    WHERE destination = $1 AND status = 'pending' AND created_at < $2
      AND (leased_by IS NULL OR next_at <= $3) AND (next_at <= $5 OR next_at > $3)
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries AS d
SET status = 'dead', next_at = $3, leased_by = NULL, updated_at = $3,
    last_error = $4::text || d.attempts || ' attempts' || coalesce(': ' || d.last_error, '')
FROM old
WHERE d.id = old.id
RETURNING d.event_id, d.route, d.conversation

-- name: lease_owners
SELECT DISTINCT leased_by FROM deliveries WHERE status = 'pending' AND leased_by IS NOT NULL

-- name: recover_leases
UPDATE deliveries SET next_at = LEAST(next_at, $2), leased_by = NULL
WHERE status = 'pending' AND leased_by = $1

-- name: give_back_lost_claims
-- Claims whose answer was lost with their connection (each may or may not have committed): a
-- claim's rows are those its owner leased until exactly its lease end, which is unique per claim
-- of this store (see PostgresStore._lease_end). Given back as `release` does, not an attempt, so
-- they are due at once instead of when the lease runs out; a claim that did not commit matches
-- nothing. A claim still running on the server holds its rows' locks: this waits for it and
-- rechecks their newest versions.
UPDATE deliveries AS d SET next_at = $4, leased_by = NULL, attempts = d.attempts - 1
FROM unnest($1::text[], $2::float8[], $3::text[]) AS lost (destination, lease_end, owner)
WHERE d.destination = lost.destination AND d.status = 'pending' AND d.next_at = lost.lease_end
  AND d.leased_by = lost.owner

-- name: next_due
SELECT min(next_at) FROM deliveries WHERE destination = $1 AND status = 'pending'

-- name: get_conversation
SELECT value FROM conversations WHERE destination = $1 AND key = $2

-- name: put_conversation
INSERT INTO conversations (destination, key, value) VALUES ($1, $2, $3)
ON CONFLICT (destination, key) DO UPDATE SET value = excluded.value

-- name: get_event
SELECT body FROM events WHERE id = $1

-- name: attempts
SELECT number, at, outcome, status, error, duration FROM attempts WHERE delivery_id = $1 ORDER BY number

-- name: heartbeat
INSERT INTO meta (key, value) VALUES ('heartbeat', $1)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: abandon_unknown
-- With a follow-up ($4 its route, $5 its destination, $6 the route it is added under; NULLs:
-- none), each delivery of that route made dead here gets a delivery of the same event to $5, in
-- this statement (a data-modifying WITH runs whether or not the query reads it); not when $5 is
-- not kept itself. With $7, deliveries leased right now (their lease not run out) are left to
-- their attempt, as `expire` leaves them. Rows locked elsewhere (a verdict being recorded,
-- another instance sweeping) are skipped, not waited for: the sweep never waits, so it is never
-- the one PostgreSQL aborts to end a deadlock, and the next sweep takes what it skipped. Each
-- locked row is rechecked against its newest version, as in `claim`.
WITH old AS (
    SELECT id FROM deliveries
    WHERE status = 'pending' AND NOT (destination = ANY($3::text[]))
      AND NOT ($7::boolean AND leased_by IS NOT NULL AND next_at > $2)
    FOR UPDATE SKIP LOCKED
), gone AS (
    UPDATE deliveries AS d SET status = 'dead', leased_by = NULL, last_error = $1, updated_at = $2
    FROM old
    WHERE d.id = old.id
    RETURNING d.destination, d.event_id, d.route, d.conversation
), followed AS (
    INSERT INTO deliveries (event_id, destination, route, conversation, ordered, status, created_at, next_at, updated_at)
    SELECT event_id, $5::text, $6::text, conversation, false, 'pending', $2, $2, $2 FROM gone
    WHERE route = $4::text AND $5::text = ANY($3::text[])
)
SELECT destination, count(*) FROM gone GROUP BY destination

-- name: order_pending
UPDATE deliveries SET ordered = true
WHERE status = 'pending' AND NOT ordered AND destination = ANY($1::text[])

-- name: stats
SELECT destination, status, count(*), min(created_at) FROM deliveries
WHERE status IN ('pending', 'dead') GROUP BY destination, status

-- name: purge_deliveries
DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries
    WHERE (status = 'delivered' AND updated_at < $1)
       OR (status = 'dead' AND updated_at < $2)
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING id, event_id

-- name: insert_dropped
INSERT INTO dropped (event_id, received_at) VALUES ($1, $2)

-- name: purge_dropped
DELETE FROM dropped WHERE event_id IN (
    SELECT event_id FROM dropped WHERE received_at < $1 ORDER BY received_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING event_id

-- name: purge_attempts
DELETE FROM attempts WHERE delivery_id = ANY($1::bigint[])

-- name: purge_events
-- A separate statement, not a CTE of purge_deliveries: CTEs share one snapshot, in which the
-- deliveries just deleted would still be there.
DELETE FROM events AS e
WHERE e.id = ANY($1::text[]) AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = e.id)

-- name: deliveries_of_event
-- (created_at: when it came in, as in every listing; see CAME_IN_SQL)
SELECT id, event_id, destination, route, status, attempts, COALESCE(came_in_at, created_at), next_at, updated_at,
    last_error, tracking_id
FROM deliveries WHERE event_id = $1 ORDER BY id

-- name: has_meta
SELECT to_regclass('meta') IS NOT NULL

-- name: get_meta
SELECT value FROM meta WHERE key = $1

-- name: set_meta
INSERT INTO meta (key, value) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: record_optout
-- The texter's latest word to the short code: only a word said later replaces the one kept (a
-- retry of the same postback, or an older one arriving late, changes nothing).
INSERT INTO optouts (texter, short_code, opted_out, word, at, event_id) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (texter, short_code) DO UPDATE
SET opted_out = excluded.opted_out, word = excluded.word, at = excluded.at, event_id = excluded.event_id
WHERE excluded.at > optouts.at OR (excluded.at = optouts.at AND excluded.opted_out >= optouts.opted_out)

-- name: opted_out
SELECT opted_out FROM optouts WHERE texter = $1 AND short_code = $2

-- name: thread_and_ledger
-- A reply's lookups in one statement (Store.thread_and_ledger): the conversation state $2 of
-- destination $1, or, when there is none, the conversation whose state is $3; and the ledger's
-- word for the texter and short code that are the last two parts of whichever was found (the
-- caller checks that they are the ones it makes of them).
WITH kept AS (
    SELECT value FROM conversations WHERE destination = $1 AND key = $2
), started AS (
    SELECT key FROM conversations
    WHERE destination = $1 AND value = $3 AND NOT EXISTS (SELECT 1 FROM kept)
    ORDER BY key LIMIT 1
), found AS (
    SELECT (SELECT value FROM kept) AS kept, (SELECT key FROM started) AS started
), parts AS (
    SELECT kept, started, reverse(split_part(reverse(coalesce(kept, started)), '|', 2)) AS texter,
        reverse(split_part(reverse(coalesce(kept, started)), '|', 1)) AS short_code
    FROM found
)
SELECT parts.kept, parts.started, parts.texter, parts.short_code, coalesce(o.opted_out, false)
FROM parts LEFT JOIN optouts AS o ON o.texter = parts.texter AND o.short_code = parts.short_code

-- name: conversation_of
SELECT key FROM conversations WHERE destination = $1 AND value = $2 ORDER BY key LIMIT 1

-- name: delivery_by_tracking_id
SELECT id, event_id, destination, route, status, attempts, coalesce(came_in_at, created_at), next_at, updated_at,
    last_error, tracking_id
FROM deliveries WHERE tracking_id = $1 ORDER BY id DESC LIMIT 1

-- name: update_event
UPDATE events SET body = $2 WHERE id = $1

-- name: release_waiting
-- An event's deliveries that wait for its media step (due later, nobody sending them) are due
-- now, and the other instances' loops for them are woken.
WITH released AS (
    UPDATE deliveries SET next_at = $4
    WHERE event_id = $1 AND destination <> $2 AND status = 'pending' AND leased_by IS NULL AND next_at > $4
    RETURNING destination
), woken AS (
    SELECT pg_notify($3, names) FROM (SELECT string_agg(DISTINCT destination, ',') AS names FROM released) AS q
    WHERE names IS NOT NULL
)
SELECT DISTINCT destination FROM released
UNION ALL
SELECT NULL FROM woken

-- name: keep_meta
WITH kept AS (
    INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING value
)
SELECT value FROM kept UNION ALL SELECT value FROM meta WHERE key = $1
-- name: postbacks_per_minute
-- (a range of the events_received index, which holds received_at)
SELECT floor(received_at / 60) * 60 AS minute, count(*)::int FROM events
WHERE received_at >= $1 GROUP BY minute ORDER BY minute

-- name: recent_errors
-- The deliveries whose latest attempt failed (delivered ones have no last_error): the partial
-- index deliveries_errors, newest first.
SELECT id, event_id, destination, route, status, attempts, COALESCE(came_in_at, created_at), next_at, updated_at,
    last_error, tracking_id
FROM deliveries WHERE last_error IS NOT NULL ORDER BY updated_at DESC, id DESC LIMIT $1

-- name: has_text_index
-- Whether this store has the text's trigram index (migration 0004: where pg_trgm could be had).
SELECT to_regclass('events_text') IS NOT NULL

-- name: merge_text_index
-- The text index's pending list merged into it (see migration 0004 and `_tidy`); the number of
-- pages it took. A second caller at once waits for the first, then finds little to do.
SELECT gin_clean_pending_list('events_text'::regclass)
