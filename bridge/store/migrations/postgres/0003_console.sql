-- 0003 console (CONTRACT §8): the indexes the console's and the admin API's lists read, so that
-- each page is a short walk of an index newest first, whatever the size of the store.
-- Events newest first (with the id that breaks ties, for keyset pages), and postbacks per
-- minute (a range of it); it replaces the index of received_at alone.
CREATE INDEX IF NOT EXISTS events_received_id ON events (received_at, id);
DROP INDEX IF EXISTS events_received;
-- A texter or short code is on either side of an event (`from` of what a texter sent, `to` of
-- a reply to them): one index each, on the same expressions the queries use (postgres.py's
-- _EventSQL.field). A conversation is the `from` index of one number with the `to` of the other.
CREATE INDEX IF NOT EXISTS events_from ON events (((body::json ->> 'from')), received_at, id);
CREATE INDEX IF NOT EXISTS events_to ON events (((body::json ->> 'to')), received_at, id);
CREATE INDEX IF NOT EXISTS events_keyword ON events ((upper(body::json ->> 'keyword')), received_at, id);
CREATE INDEX IF NOT EXISTS events_type ON events (type, received_at, id);
-- Deliveries newest first (by id) of a status, or of a destination; the last errors.
CREATE INDEX IF NOT EXISTS deliveries_status_id ON deliveries (status, id);
CREATE INDEX IF NOT EXISTS deliveries_destination_id ON deliveries (destination, id);
CREATE INDEX IF NOT EXISTS deliveries_errors ON deliveries (updated_at, id) WHERE last_error IS NOT NULL;
-- The pending and dead counts per destination and the oldest undelivered (`stats`: the Overview
-- and /metrics), from the index alone: dead ones pile up, and reading each row was 0.6 s at 2M.
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (status, destination, created_at)
    WHERE status IN ('pending', 'dead');
-- Text search: a trigram index of each event's text (pg_trgm, a contrib extension PostgreSQL
-- ships, trusted: a database owner may add it), which ILIKE '%part%' uses. Made in the public
-- schema, so that no store's schema holds what another store's index needs. Where it cannot be
-- had (no contrib package, no right to add it), text search works without it, reading events.
DO $$
DECLARE
    home text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
        BEGIN
            CREATE EXTENSION pg_trgm SCHEMA public;
        EXCEPTION WHEN others THEN
            RAISE NOTICE 'pg_trgm cannot be added (%): text search reads the events without an index', SQLERRM;
        END;
    END IF;
    SELECT n.nspname INTO home FROM pg_opclass AS c JOIN pg_namespace AS n ON n.oid = c.opcnamespace
    JOIN pg_am AS a ON a.oid = c.opcmethod WHERE c.opcname = 'gin_trgm_ops' AND a.amname = 'gin';
    IF home IS NOT NULL THEN
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS events_text ON events USING gin ((body::json ->> %L) %I.gin_trgm_ops)',
            'text', home
        );
    END IF;
END
$$;
