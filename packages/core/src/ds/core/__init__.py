"""ds core: the thin centre that plugins compose around.

    import ds.core
    engine, optimizer, loader, scheduler = ds.core.initialize(model=model, config="ds_config.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pluggy

from ds.core.hookspecs import PROJECT_NAME

try:
    __version__ = version("ds-core")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for hook implementations: ``@ds.core.hookimpl def ds_register_optimizers(register): ...``"""


def initialize(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - signature lives on the engine
    """DeepSpeed-compatible entry point; see :func:`ds.core.engine.initialize`."""
    from ds.core.engine import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = ["__version__", "hookimpl", "initialize"]
