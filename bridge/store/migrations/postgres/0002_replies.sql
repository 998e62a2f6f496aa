-- 0002 replies (CONTRACT §7): what answering texters from Slack keeps.
-- The peer's id for a delivered message (Skycore's TRACKINGID for an SMS sent with sendSMS), so
-- that the delivery reports that name it can be matched to the reply. A nullable column with no
-- default: adding it rewrites nothing.
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS tracking_id text;
CREATE INDEX IF NOT EXISTS deliveries_tracking ON deliveries (tracking_id) WHERE tracking_id IS NOT NULL;
-- The opt-out ledger: each texter's latest word to each short code. `opted_out` true after STOP
-- (or SUB N302), false after START (or SUB N301); `at` is when they said it (the postback's
-- timestamp, else when it came in), and only a later word replaces it.
CREATE TABLE IF NOT EXISTS optouts (
    texter text NOT NULL,
    short_code text NOT NULL,
    opted_out boolean NOT NULL,
    word text NOT NULL,                         -- the keyword or SUB code that said it
    at double precision NOT NULL,
    event_id text NOT NULL,
    PRIMARY KEY (texter, short_code)
);
-- A Slack thread back to its conversation (a reply names the thread, not the texter).
CREATE INDEX IF NOT EXISTS conversations_value ON conversations (destination, value);
