"""The base of every error that is the user's to fix: the CLI turns it into one line and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a directory); the message names it and says what would work."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; ``key`` is the field (the CLI shows it as ``--key-name``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")
