"""MMS media (CONTRACT §9): each file of an MMS fetched once after the 200, kept under its
content hash, and served back at `/media/<sha256>` by a signed link that expires.

- (`bridge.mediatypes`: what a file is, from its first bytes; pure, shared with the destinations.)
- `links`: the signed links (pure).
- `guard`: which addresses may be fetched (the SSRF rules) and the resolver that enforces them.
- `fetch`: one file, within the limits.
- `stores`: where kept files live: a directory or an S3-compatible bucket.
- `step`: the `~media` internal destination, the durable, retried fetch step of one event.
- `serve`: the `/media/<sha256>` handler.
"""
