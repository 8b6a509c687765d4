"""What {{module}} adds to ds, through the hooks of ``ds.core.hookspecs``.

ds imports this module through the entry point in pyproject.toml. Implement the hooks
this package needs (registration hooks get a ``register`` callable); each one runs when
a run is composed, never per training step. ``ds report`` prints the lines below under
the plugin's name.
"""

from __future__ import annotations

from importlib.metadata import version

import ds.core


@ds.core.hookimpl
def ds_report_lines() -> list[str]:
    return [f"ds-{{name}} {version('ds-{{name}}')}"]
