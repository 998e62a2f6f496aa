-- 0004 event columns (issue 21): the fields the console's and the admin API's event lists
-- filter on (`from`, `to`, keyword, text) in columns of their own, written by the bridge with
-- the event, so that their indexes are made from a value rather than from the JSON body read
-- again for each index of each new event (three times a postback: 0003's expression indexes),
-- and the text index is fed from the column. Only string values: the store writes what is a
-- string in the event and NULL otherwise.
ALTER TABLE events ADD COLUMN sender TEXT;     -- the event's `from`
ALTER TABLE events ADD COLUMN recipient TEXT;  -- its `to`
ALTER TABLE events ADD COLUMN keyword TEXT;    -- its keyword, as it came (searched in any case)
ALTER TABLE events ADD COLUMN text TEXT;       -- its text
-- 0003's indexes on the JSON go first, so that filling the columns does not keep them up to
-- date row by row, and are made again on the columns afterwards (same names, same order of keys).
DROP INDEX IF EXISTS events_from;
DROP INDEX IF EXISTS events_to;
DROP INDEX IF EXISTS events_keyword;
-- The events stored before. (It rewrites every row: on a big store this migration takes a
-- while, once.)
UPDATE events
SET sender = CASE json_type(body, '$.from') WHEN 'text' THEN json_extract(body, '$.from') END,
    recipient = CASE json_type(body, '$.to') WHEN 'text' THEN json_extract(body, '$.to') END,
    keyword = CASE json_type(body, '$.keyword') WHEN 'text' THEN json_extract(body, '$.keyword') END,
    text = CASE json_type(body, '$.text') WHEN 'text' THEN json_extract(body, '$.text') END;
CREATE INDEX events_from ON events (sender, received_at, id);
CREATE INDEX events_to ON events (recipient, received_at, id);
CREATE INDEX events_keyword ON events (upper(keyword), received_at, id);
