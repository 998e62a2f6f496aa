-- 0005 orphan deliveries: from 0003 until this release, a commit that held Skycore's retries of
-- stored postbacks beside as many new ones (one retry and one new postback, say) took the rows
-- the text-index trigger adds for new events as the retries' own: it answered each retry as a
-- new event and stored deliveries for it under an event id that has no row in `events`. Every
-- claim of that destination failed on them from then on, so nothing more was delivered there.
-- Such a retry's first postback is stored with its own deliveries: these rows are copies that
-- can never be sent (there is no event to send), and they go. Never attempted (their claims
-- failed), they have no attempts.
DELETE FROM deliveries WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.id = deliveries.event_id);
