"""Exceptions ds raises on purpose. Each message names the problem and the fix."""

from __future__ import annotations


class DsError(Exception):
    """Base of every error ds raises deliberately."""


class ConfigError(DsError, ValueError):
    """A config that cannot be used: unknown key, bad value, unsupported combination."""


class MissingPillarError(ConfigError):
    """A config asks for a feature whose package is not installed."""


class PluginError(DsError):
    """A plugin registered something inconsistent (duplicate name, bad component)."""


class CollectiveTimeoutError(DsError, TimeoutError):
    """A collective did not complete in time; names the op, group and missing ranks."""


class CheckpointError(DsError):
    """A checkpoint that cannot be written or read as asked."""
