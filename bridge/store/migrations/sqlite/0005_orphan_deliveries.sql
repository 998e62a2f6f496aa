-- 0005 orphan deliveries: from 0003 until this release, SQLite told a commit's new events from
-- Skycore's retries by a count that also took in the rows 0003's text-index trigger adds, and a
-- commit that held as many retries as new postbacks looked all new. Each retry was answered as
-- a new event, and its deliveries were stored under an event id that has no row in `events`.
-- Every claim of that destination failed on them from then on, so nothing more was delivered
-- there. Such rows come in two kinds:
-- * a retry of a postback stored in an earlier commit: that one has its own deliveries, and
--   these rows are copies with nothing to send;
-- * two copies of a new postback in the same commit (a retry that came while the first was
--   still queued): the first copy's event was stored with no delivery and no `dropped` row,
--   and these rows are its only deliveries.
-- The second kind goes back to its event: one received within 10 s of the rows, in their
-- conversation (the texter and short code, as bridge.destinations.base.conversation_key makes
-- it), that has no delivery and no `dropped` row; the nearest in time, one lost id to an event,
-- and a second round for a lost id whose nearest went to another (one texter's two postbacks,
-- each sent twice in one commit, cannot be told apart: each keeps an event of that texter's).
-- The rest go. Never attempted (their claims failed), they have no attempts; none are left
-- behind if they had (SQLite reuses a deleted row's id).
CREATE TEMP TABLE orphaned_0005 AS
SELECT event_id AS lost, min(coalesce(came_in_at, created_at)) AS at, min(conversation) AS conversation
FROM deliveries
WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id)
GROUP BY event_id;

CREATE TEMP TABLE candidates_0005 AS
SELECT o.lost, v.id AS event_id, abs(v.received_at - o.at) AS gap
FROM orphaned_0005 AS o JOIN events AS v ON v.received_at BETWEEN o.at - 10 AND o.at + 10
WHERE NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.event_id = v.id)
  AND NOT EXISTS (SELECT 1 FROM dropped AS x WHERE x.event_id = v.id)
  AND o.conversation = CASE WHEN v.type IN ('sms.status', 'mms.status', 'sms.reply')
      THEN coalesce(json_extract(v.body, '$.to'), '') || '|' || coalesce(json_extract(v.body, '$.from'), '')
      ELSE coalesce(json_extract(v.body, '$.from'), '') || '|' || coalesce(json_extract(v.body, '$.to'), '') END;

CREATE TEMP TABLE found_0005 (lost TEXT PRIMARY KEY, event_id TEXT NOT NULL UNIQUE);

-- round one: each lost id's nearest event; an event two lost ids found goes to the nearer
INSERT INTO found_0005 (lost, event_id)
SELECT lost, event_id FROM (
    SELECT lost, event_id, row_number() OVER (PARTITION BY event_id ORDER BY gap, lost) AS rank
    FROM (
        SELECT lost, event_id, gap, row_number() OVER (PARTITION BY lost ORDER BY gap, event_id) AS nearest
        FROM candidates_0005
    )
    WHERE nearest = 1
)
WHERE rank = 1;

-- round two, for the lost ids left: the nearest of the events still free
INSERT INTO found_0005 (lost, event_id)
SELECT lost, event_id FROM (
    SELECT lost, event_id, row_number() OVER (PARTITION BY event_id ORDER BY gap, lost) AS rank
    FROM (
        SELECT c.lost, c.event_id, c.gap, row_number() OVER (PARTITION BY c.lost ORDER BY c.gap, c.event_id) AS nearest
        FROM candidates_0005 AS c
        WHERE c.lost NOT IN (SELECT lost FROM found_0005) AND c.event_id NOT IN (SELECT event_id FROM found_0005)
    )
    WHERE nearest = 1
)
WHERE rank = 1;

UPDATE deliveries SET event_id = (SELECT f.event_id FROM found_0005 AS f WHERE f.lost = deliveries.event_id)
WHERE event_id IN (SELECT lost FROM found_0005);

DELETE FROM attempts WHERE delivery_id IN (
    SELECT id FROM deliveries WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id)
);

DELETE FROM deliveries WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id);

DROP TABLE orphaned_0005;

DROP TABLE candidates_0005;

DROP TABLE found_0005;
