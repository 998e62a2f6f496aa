-- 0004 event columns: on PostgreSQL, an event's `from`, `to`, keyword and text go into columns of
-- their own, so that its indexes are made from values rather than from the JSON parsed again
-- for each index. Nothing changes on SQLite: its indexes stay on json_extract of the body
-- (0003), which parses a row's JSON once for all of them (SQLite keeps the last parsed JSON
-- texts of a statement), while columns cost each postback more than they saved: 0.099-0.105
-- ms of CPU a postback with the expressions, 0.111-0.113 with the columns (the store alone,
-- 32 at once, 30,000 postbacks, alternated). Kept as a file so that both backends have the
-- same migrations (and the one statement every migration has, which does nothing).
SELECT 1;
