-- 0003 console (CONTRACT §8): the indexes the console's and the admin API's lists read, so that
-- each page is a short walk of an index newest first, whatever the size of the store.
-- Events newest first, and postbacks per minute (a range of it).
CREATE INDEX IF NOT EXISTS events_received_id ON events (received_at, id);
-- A texter or short code is on either side of an event (`from` of what a texter sent, `to` of
-- a reply to them): one index each, on the same expressions the queries use (sqlite.py's
-- _EventSQL.field). A conversation is the `from` index of one number with the `to` of the other.
CREATE INDEX IF NOT EXISTS events_from ON events (json_extract(body, '$.from'), received_at, id);
CREATE INDEX IF NOT EXISTS events_to ON events (json_extract(body, '$.to'), received_at, id);
CREATE INDEX IF NOT EXISTS events_keyword ON events (upper(json_extract(body, '$.keyword')), received_at, id);
CREATE INDEX IF NOT EXISTS events_type ON events (type, received_at, id);
-- Deliveries newest first (by id) of a status, or of a destination; the last errors.
CREATE INDEX IF NOT EXISTS deliveries_status_id ON deliveries (status, id);
CREATE INDEX IF NOT EXISTS deliveries_destination_id ON deliveries (destination, id);
CREATE INDEX IF NOT EXISTS deliveries_errors ON deliveries (updated_at, id) WHERE last_error IS NOT NULL;
-- The pending and dead counts per destination and the oldest undelivered (`stats`: the Overview
-- and /metrics), from the index alone: dead ones pile up, and reading each row was 0.6 s at 2M.
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (status, destination, created_at)
    WHERE status IN ('pending', 'dead');
-- Text search: a trigram index of each event's text (any part of 3 characters or more, any
-- case). detail=none: it says which events have each trigram, not where (cheaper to keep; a
-- search asks for every trigram of what it looks for and tests the text of what comes back). It
-- holds the event's id rather than relying on the rowid alone, which a VACUUM may renumber in a
-- table without an INTEGER PRIMARY KEY: a search looks events up by id, and a purge deletes only
-- the row that is its own event's.
CREATE VIRTUAL TABLE IF NOT EXISTS events_text USING fts5 (
    text, event_id UNINDEXED, tokenize = 'trigram', detail = 'none', columnsize = 0
);
-- A new event is not indexed as it is stored: its rowid waits here, and the store indexes what
-- waits a few hundred at a time (sqlite.py, `_index_text`), a sixth of the cost of one at a
-- time in each postback's commit. A search reads what waits as it is.
CREATE TABLE IF NOT EXISTS events_text_pending (event_rowid INTEGER PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS events_text_queue AFTER INSERT ON events
BEGIN
    INSERT OR IGNORE INTO events_text_pending (event_rowid) VALUES (new.rowid);
END;
CREATE TRIGGER IF NOT EXISTS events_text_delete AFTER DELETE ON events
BEGIN
    DELETE FROM events_text WHERE rowid = old.rowid AND event_id = old.id;
END;
-- The events stored before, indexed here, in the migration (OR REPLACE: a store from before
-- versioned migrations runs them all again).
INSERT OR REPLACE INTO events_text (rowid, text, event_id)
    SELECT rowid, json_extract(body, '$.text'), id FROM events WHERE json_extract(body, '$.text') IS NOT NULL;
