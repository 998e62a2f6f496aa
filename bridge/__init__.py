"""postback-bridge: Skycore postbacks to Slack, email and webhooks, durably."""

__version__ = "0.1.0"
