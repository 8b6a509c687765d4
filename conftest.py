"""Repository-wide pytest behaviour: ``gpu`` tests skip themselves where torch sees no GPU.

The CPU suite and the GPU machine run the same test files; marking a test
``@pytest.mark.gpu`` is all it takes to keep it off CPU-only machines (ROCm builds of
torch report their GPUs through ``torch.cuda`` too).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # imported only when a gpu test was collected, so collection stays cheap

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU: torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)
