-- 0004 event columns (issue 21): the fields the console's and the admin API's event lists
-- filter on (`from`, `to`, keyword, text) in columns of their own, written by the bridge with
-- the event, so that their indexes are made from a value rather than from the JSON body parsed
-- again for each index of each new event (four times a postback: 0003's expression indexes).
-- Only string values: the store writes what is a string in the event and NULL otherwise.
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS sender text,        -- the event's `from`
    ADD COLUMN IF NOT EXISTS recipient text,     -- its `to`
    ADD COLUMN IF NOT EXISTS keyword text,       -- its keyword, as it came (searched in any case)
    ADD COLUMN IF NOT EXISTS text text;          -- its text
-- 0003's indexes on the JSON go first, so that filling the columns does not keep them up to
-- date row by row (each a parse of the body), and are made again on the columns afterwards
-- (same names, same order of keys).
DROP INDEX IF EXISTS events_from;
DROP INDEX IF EXISTS events_to;
DROP INDEX IF EXISTS events_keyword;
DROP INDEX IF EXISTS events_text;
-- The events stored before, each body parsed once. (It rewrites every row: on a big store this
-- migration takes a while, once; the instances wait for it, as for any migration.)
UPDATE events
SET (sender, recipient, keyword, text) = (
    SELECT CASE json_typeof(j -> 'from') WHEN 'string' THEN j ->> 'from' END,
           CASE json_typeof(j -> 'to') WHEN 'string' THEN j ->> 'to' END,
           CASE json_typeof(j -> 'keyword') WHEN 'string' THEN j ->> 'keyword' END,
           CASE json_typeof(j -> 'text') WHEN 'string' THEN j ->> 'text' END
    FROM (SELECT body::json AS j) AS parsed
);
CREATE INDEX events_from ON events (sender, received_at, id);
CREATE INDEX events_to ON events (recipient, received_at, id);
CREATE INDEX events_keyword ON events (upper(keyword), received_at, id);
-- The text's trigram index (where pg_trgm is there, as in 0003). New entries go to the index's
-- pending list (GIN's fastupdate) and are merged into it in bulk. Left alone, the insert that
-- finds the list past gin_pending_list_limit (4 MB by default) merges it itself, and its
-- postbacks wait: tens of milliseconds, up to 180 measured. The bridge merges it every second
-- instead, off the postbacks' path (postgres.py, `_merge_text_index`); the limit is raised so
-- that an insert merges only when that has not run for a long while (no instance up, or no
-- right to).
DO $$
DECLARE
    home text;
BEGIN
    SELECT n.nspname INTO home FROM pg_opclass AS c JOIN pg_namespace AS n ON n.oid = c.opcnamespace
    JOIN pg_am AS a ON a.oid = c.opcmethod WHERE c.opcname = 'gin_trgm_ops' AND a.amname = 'gin';
    IF home IS NOT NULL THEN
        EXECUTE format(
            'CREATE INDEX events_text ON events USING gin (text %I.gin_trgm_ops) WITH (gin_pending_list_limit = 32768)',
            home
        );
    END IF;
END
$$;
