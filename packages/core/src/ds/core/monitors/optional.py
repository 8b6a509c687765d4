"""Optional packages that monitors need, checked without importing them."""

from __future__ import annotations

from importlib.util import find_spec

from ds.core.errors import ConfigError


def require_module(module: str, *, feature: str, install: str) -> None:
    """Raise a ConfigError naming ``install`` when ``module`` cannot be imported.

    Uses ``find_spec`` so the check is cheap and can run on every rank, making a
    misconfigured run fail everywhere at start-up rather than on rank 0 alone.
    """
    if find_spec(module) is None:
        raise ConfigError(f"{feature} is enabled but the {module!r} package is not installed. "
                          f"Install it with: {install}, or disable {feature} in the config.")
