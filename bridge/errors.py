"""The project's exception tree.

BridgeError
├── ConfigError         the config file is invalid (carries every problem at once)
├── PostbackError       a request body is not a postback we can take (-> 400)
└── StoreError          the store cannot take or give data right now (-> 503)
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error postback-bridge raises on purpose."""


class ConfigError(BridgeError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PostbackError(BridgeError):
    """The body is not a postback; the message is safe to show to the sender."""


class StoreError(BridgeError):
    """The store failed; the request that needed it should be retried later."""
