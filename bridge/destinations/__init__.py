"""Destinations: one module per `type:`, each making exactly one attempt per call.

A destination renders an event and sends it once; it says how the attempt went (Delivered, or
Failed with retryable yes/no and a reason). The delivery loop (`bridge.delivery`) owns
attempts, backoff, leases and logging, so no destination retries on its own.

`base` is what they all are; `registry` maps `type:` to a module. Each module owns its config:
`parse` validates its options into frozen data, `build` makes the live destination from them.
"""
