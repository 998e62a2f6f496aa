-- 0003: a placeholder in the consolescale branch only, for the migration another branch was given this
-- number for: without it the numbers would have a gap (schema.migrations refuses that). When the
-- branches are merged, delete this file for that branch's 0003_*.sql (two files of one number fail
-- loudly), or keep it if that number went unused.
SELECT 1;
