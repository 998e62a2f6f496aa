-- 0005 orphan deliveries: SQLite's 0005 repairs the deliveries it stored for Skycore's retries
-- under event ids that have no event (a miscount of new events, SQLite's alone). PostgreSQL
-- tells new events from retries by what its insert RETURNs, and its foreign key would refuse
-- such a row anyway: nothing to do. Kept as a file so that both backends have the same
-- migrations (and the one statement every migration has, which does nothing).
SELECT 1;
