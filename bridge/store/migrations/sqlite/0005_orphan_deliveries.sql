-- 0005 orphan deliveries: from 0003 until this release, SQLite told a commit's new events from
-- Skycore's retries by a count that also took in the rows 0003's text-index trigger adds, and a
-- commit that held as many retries as new postbacks looked all new. Each retry was answered as
-- a new event, and its deliveries were stored under an event id that has no row in `events`.
-- Every claim of that destination failed on them from then on, so nothing more was delivered
-- there. Such rows come in two kinds:
-- * a retry of a postback stored in an earlier commit: that one has its own deliveries, and
--   these rows are copies with nothing to send;
-- * two copies of a new postback in the same commit (a retry that came while the first was
--   still queued): the first copy's event was stored with no delivery and no `dropped` row (a
--   state nothing else leaves), and these rows are its only deliveries.
-- The second kind goes back to its event: the event received within 10 s of the rows that has
-- neither, the nearest in time if there are several. The rest go. Never attempted (their
-- claims failed), they have no attempts; none are left behind if they had.
CREATE TEMP TABLE orphaned_0005 AS
SELECT event_id AS lost, min(coalesce(came_in_at, created_at)) AS at
FROM deliveries
WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id)
GROUP BY event_id;

CREATE TEMP TABLE nearest_0005 AS
SELECT lost, event_id, gap FROM (
    SELECT o.lost, v.id AS event_id, abs(v.received_at - o.at) AS gap,
           row_number() OVER (PARTITION BY o.lost ORDER BY abs(v.received_at - o.at), v.id) AS rank
    FROM orphaned_0005 AS o JOIN events AS v ON v.received_at BETWEEN o.at - 10 AND o.at + 10
    WHERE NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.event_id = v.id)
      AND NOT EXISTS (SELECT 1 FROM dropped AS x WHERE x.event_id = v.id)
)
WHERE rank = 1;

-- one lost id to an event: should two find the same one, the nearer in time has it
CREATE TEMP TABLE found_0005 AS
SELECT lost, event_id FROM (
    SELECT lost, event_id, row_number() OVER (PARTITION BY event_id ORDER BY gap, lost) AS rank
    FROM nearest_0005
)
WHERE rank = 1;

UPDATE deliveries SET event_id = (SELECT f.event_id FROM found_0005 AS f WHERE f.lost = deliveries.event_id)
WHERE event_id IN (SELECT lost FROM found_0005);

DELETE FROM attempts WHERE delivery_id IN (
    SELECT id FROM deliveries WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id)
);

DELETE FROM deliveries WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id);

DROP TABLE orphaned_0005;

DROP TABLE nearest_0005;

DROP TABLE found_0005;
