"""Shared fixtures: a fresh plugin set with this package loaded from its entry point."""

from __future__ import annotations

import pytest

from ds.core.kernels import KernelSelection, install_kernels, reset_kernels
from ds.core.plugins import Components, load_components, make_plugin_set


@pytest.fixture
def components() -> Components:
    return load_components(make_plugin_set(autoload=False, allow={"kernels-cuda"}))


@pytest.fixture
def installed(components: Components) -> KernelSelection:
    """Kernels selected from core plus this package, undone after the test."""
    selection = install_kernels(components)
    yield selection
    reset_kernels()
