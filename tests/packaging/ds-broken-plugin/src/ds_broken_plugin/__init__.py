"""A plugin whose import fails, as a plugin built against another ds or torch would.

ds must record the failure, show it in ``ds report`` and carry on without it.
"""

raise RuntimeError("ds-broken-plugin fails on import on purpose")
