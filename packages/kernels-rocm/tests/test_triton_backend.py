"""ds-kernels-rocm offers ds-kernels-cuda's Triton kernels (a linked folder) as rocm-triton."""

from __future__ import annotations

import pytest
import torch

from ds.core.plugins import load_components, make_plugin_set


def test_rocm_triton_is_registered_for_hip_torch_only() -> None:
    components = load_components(make_plugin_set(autoload=False, allow={"kernels-rocm"}))
    backend = components.kernel_backends.registration("rocm-triton").value
    assert backend.runtime == "hip" and type(backend).__module__ == "ds.kernels.rocm.triton_kernels.backend"
    assert {"rms_norm", "layer_norm_backward", "quantize_blockwise", "woq_matmul"} <= set(backend.ops())
    if torch.version.hip is None:
        assert "not built for ROCm/HIP" in backend.availability("rms_norm", "cuda").reason


def test_the_linked_kernels_import_under_the_rocm_package() -> None:
    pytest.importorskip("triton")
    from ds.kernels.rocm.triton_kernels import norms, quantize, woq_matmul

    assert callable(norms.rms_norm) and callable(quantize.quantize_blockwise) and callable(woq_matmul.woq_matmul)
