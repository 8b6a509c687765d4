"""CPU Adam, AdamW and Adagrad against torch.optim, on every path this machine can run.

Tolerance: torch's own vectorised sqrt is not correctly rounded, so a parameter can
differ from torch's by an ulp where the update passes close to zero. Each element must
agree within 1e-6 of its own magnitude or of the tensor's largest magnitude, and the
whole tensor within 1e-6 relative in norm. The optimizer states are compared the same way.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ds.core.errors import ConfigError
from ds.core.plugins import load_components, make_plugin_set
from ds.zero import CPUAdagrad, CPUAdam, plugin
from ds.zero._native import ISA_ENV, available_isas, native_extension
from ds.zero.cpu_optim_ops import AdamScalars, CPUOptimizerInputError, adam_update_

ALL_PATHS = ["avx512", "avx2", "scalar", "torch"]
NATIVE_PATHS = [isa for isa in available_isas() if isa != "torch"]
# Sizes cover vector tails (odd sizes) and the OpenMP-threaded range (>= 32768 elements).
SIZES = (1, 17, 1000, 40_003)
STEPS = 5


def _require(isa: str) -> None:
    if isa not in available_isas():
        pytest.skip(f"this machine cannot run the {isa} path (has {available_isas()})")


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale)
    assert float((actual - expected).norm()) <= 1e-6 * float(expected.norm())


def _params(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator) for n in SIZES]


def _run_pair(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, seed: int,
              steps: int = STEPS) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    mine = [p for g in ours.param_groups for p in g["params"]]
    ref = [p for g in theirs.param_groups for p in g["params"]]
    for _ in range(steps):
        for a, b in zip(mine, ref, strict=True):
            grad = torch.randn(a.shape, generator=generator)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()


def _twin_params(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    base = _params(seed)
    return ([p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base])


@pytest.mark.parametrize("isa", ALL_PATHS)
@pytest.mark.parametrize("adamw_mode", [True, False], ids=["adamw", "adam_l2"])
def test_adam_matches_torch(isa: str, adamw_mode: bool) -> None:
    _require(isa)
    mine, ref = _twin_params(0)
    hyper = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    ours = CPUAdam(mine, **hyper, adamw_mode=adamw_mode, isa=isa)
    theirs = (torch.optim.AdamW if adamw_mode else torch.optim.Adam)(ref, **hyper)
    assert ours.isa == isa
    _run_pair(ours, theirs, seed=0)
    for a, b in zip(mine, ref, strict=True):
        _assert_matches(a.detach(), b.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_matches(ours.state[a][key], theirs.state[b][key])
        assert float(ours.state[a]["step"]) == STEPS


def test_native_paths_are_bit_identical() -> None:
    if len(NATIVE_PATHS) < 2:
        pytest.skip(f"only {NATIVE_PATHS} available")
    results = []
    for isa in NATIVE_PATHS:
        params = [p.requires_grad_() for p in _params(3)]
        optimizer = CPUAdam(params, lr=1e-2, weight_decay=0.05, isa=isa)
        generator = torch.Generator().manual_seed(4)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        results.append(torch.cat([p.detach() for p in params]))
    for isa, result in zip(NATIVE_PATHS[1:], results[1:], strict=True):
        assert torch.equal(result, results[0]), f"{isa} differs from {NATIVE_PATHS[0]}"


@pytest.mark.parametrize("isa", ALL_PATHS)
def test_adagrad_matches_torch(isa: str) -> None:
    _require(isa)
    mine, ref = _twin_params(1)
    hyper = {"lr": 5e-2, "lr_decay": 0.01, "weight_decay": 0.1,
             "initial_accumulator_value": 0.1, "eps": 1e-8}
    ours = CPUAdagrad(mine, **hyper, isa=isa)
    theirs = torch.optim.Adagrad(ref, **hyper)
    _run_pair(ours, theirs, seed=1)
    for a, b in zip(mine, ref, strict=True):
        _assert_matches(a.detach(), b.detach())
        _assert_matches(ours.state[a]["sum"], theirs.state[b]["sum"])


@pytest.mark.parametrize("isa", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_is_the_rounded_update(isa: str, dtype: torch.dtype) -> None:
    _require(isa)
    params = [p.requires_grad_() for p in _params(2)]
    # Every other copy starts one element into its buffer: misaligned for vector stores,
    # so both the streaming and the plain store paths run.
    copies = [torch.empty(p.numel() + i % 2, dtype=dtype)[i % 2:] for i, p in enumerate(params)]
    optimizer = CPUAdam(params, lr=1e-2, isa=isa)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step(low_precision_params=copies)
        for p, copy in zip(params, copies, strict=True):
            assert torch.equal(copy.view(torch.int16), p.detach().to(dtype).view(torch.int16))


@pytest.mark.parametrize("isa", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_rounds_special_values_like_torch(isa: str, dtype: torch.dtype) -> None:
    _require(isa)
    # Halfway cases of both formats, overflow, subnormals, signed zero, infinities, NaN,
    # repeated so the vector body (not only the scalar tail) sees them.
    specials = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0,
                3.4e38, 1e-7, 6e-8, 1e-40, -0.0, 0.0, float("inf"), float("-inf"),
                float("nan"), -2.5, 0.1]
    values = torch.tensor(specials * 8, dtype=torch.float32).requires_grad_()
    values.grad = torch.zeros_like(values)
    copy = torch.empty(values.shape, dtype=dtype)
    CPUAdam([values], lr=0.0, isa=isa).step(low_precision_params=[copy])
    torch.testing.assert_close(values.detach()[:len(specials)], torch.tensor(specials),
                               rtol=0, atol=0, equal_nan=True)
    # torch's own NaN bit patterns differ between its scalar and vector conversions.
    is_nan = values.detach().isnan()
    assert bool(copy[is_nan].isnan().all())
    expected = values.detach()[~is_nan].to(dtype)
    assert torch.equal(copy[~is_nan].view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("isa", NATIVE_PATHS or ["avx2"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_grads_and_multiplier_match_torch_path(
    isa: str, grad_dtype: torch.dtype
) -> None:
    """ZeRO-Offload hands over flat buffers directly, gradients often in bf16 and scaled."""
    _require(isa)
    generator = torch.Generator().manual_seed(6)
    for numel in SIZES:
        param = torch.randn(numel, generator=generator)
        buffers = {path: [param.clone(), torch.zeros(numel), torch.zeros(numel)]
                   for path in (isa, "torch")}
        for step in (1, 2, 3):
            grad = (torch.randn(numel, generator=generator) * 1024).to(grad_dtype)
            scalars = AdamScalars.for_step(step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.01, decoupled_weight_decay=False)
            for path, (p, exp_avg, exp_avg_sq) in buffers.items():
                adam_update_(p, grad, exp_avg, exp_avg_sq, scalars, isa=path,
                             grad_multiplier=1 / 1024)
        for ours, reference in zip(buffers[isa], buffers["torch"], strict=True):
            _assert_matches(ours, reference)


def _saved_and_loaded(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_moves_between_cpu_adam_and_torch_adamw() -> None:
    mine, ref = _twin_params(8)
    ours = CPUAdam(mine, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    _run_pair(ours, theirs, seed=8, steps=3)

    # Cross over through saved checkpoints: torch continues from ours, we from torch's.
    torch_from_ours = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in mine])
    torch_from_ours.load_state_dict(_saved_and_loaded(ours.state_dict()))
    ours_from_torch = CPUAdam([p.detach().clone().requires_grad_() for p in ref], lr=0.5)
    ours_from_torch.load_state_dict(_saved_and_loaded(theirs.state_dict()))
    assert ours_from_torch.param_groups[0]["lr"] == 1e-2
    assert ours_from_torch.param_groups[0]["decoupled_weight_decay"] is True

    _run_pair(ours_from_torch, torch_from_ours, seed=9, steps=2)
    _run_pair(ours, theirs, seed=9, steps=2)
    for group in (ours_from_torch.param_groups, torch_from_ours.param_groups):
        for a, b in zip(group[0]["params"], ref, strict=True):
            _assert_matches(a.detach(), b.detach())
    assert all(float(s["step"]) == 5 for s in ours_from_torch.state.values())


def test_isa_environment_variable_forces_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ISA_ENV, "scalar" if NATIVE_PATHS else "torch")
    optimizer = CPUAdam([torch.zeros(4, requires_grad=True)])
    assert optimizer.isa == ("scalar" if NATIVE_PATHS else "torch")
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ConfigError, match=r"'sse9' is not available.*Available: "):
        CPUAdam([torch.zeros(4, requires_grad=True)])


def test_fallback_without_extension_warns_once_and_matches_torch() -> None:
    script = textwrap.dedent(
        """
        import warnings
        import torch
        warnings.simplefilter("always")
        from ds.zero import CPUAdam
        from ds.zero._native import describe
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = torch.randn(1000, requires_grad=True)
            q = p.detach().clone().requires_grad_()
            ours, ref = CPUAdam([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2, weight_decay=0)
            CPUAdam([torch.zeros(3, requires_grad=True)])
        for _ in range(3):
            g = torch.randn(1000)
            p.grad, q.grad = g.clone(), g.clone()
            ours.step(); ref.step()
        messages = [str(w.message) for w in caught if "native CPU optimizer" in str(w.message)]
        print("isa", ours.isa, "warnings", len(messages), "equal", torch.equal(p, q))
        print(messages[0])
        print(describe())
        """
    )
    env = {**os.environ, "DS_CPU_ADAM_DISABLE_NATIVE": "1"}
    env.pop(ISA_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "isa torch warnings 1 equal True"
    assert "disabled by DS_CPU_ADAM_DISABLE_NATIVE" in lines[1]
    assert "pip install --force-reinstall" in lines[1]
    assert lines[2].startswith("cpu_adam: torch fallback (disabled by")


def test_bad_tensors_are_rejected_with_the_fix() -> None:
    double = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    double.grad = torch.zeros_like(double)
    with pytest.raises(CPUOptimizerInputError, match=r"param has dtype torch\.float64"):
        CPUAdam([double]).step()

    param = torch.zeros(8, requires_grad=True)
    param.grad = torch.zeros(16)[::2]
    with pytest.raises(CPUOptimizerInputError, match="grad is not a contiguous"):
        CPUAdam([param]).step()

    param.grad = torch.zeros(8)
    with pytest.raises(CPUOptimizerInputError, match="low_precision_param has dtype"):
        CPUAdam([param]).step(low_precision_params=[torch.zeros(8, dtype=torch.int8)])
    with pytest.raises(ConfigError, match="low_precision_params has 2 entries"):
        CPUAdam([param]).step(low_precision_params=[None, None])

    optimizer = CPUAdam([param])
    optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(ConfigError, match="does not implement amsgrad"):
        optimizer.step()


def test_native_module_validates_raw_arguments() -> None:
    native = native_extension().module
    if native is None:
        pytest.skip(f"native extension unavailable: {native_extension().unavailable_reason}")
    buffers = [torch.zeros(4) for _ in range(4)]
    args = {"param": buffers[0].data_ptr(), "grad": buffers[1].data_ptr(),
            "grad_dtype": native.DTYPE_FLOAT32, "exp_avg": buffers[2].data_ptr(),
            "exp_avg_sq": buffers[3].data_ptr(), "copy": 0, "copy_dtype": native.DTYPE_NONE,
            "numel": 4, "one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 0.001,
            "eps": 1e-8, "step_size": 1e-3, "bias_correction2_sqrt": 1.0,
            "l2_weight_decay": 0.0, "param_decay": 1.0, "grad_multiplier": 1.0, "isa": "scalar"}
    with pytest.raises(ValueError, match="unknown instruction-set path 'mmx'"):
        native.adam_step(**{**args, "isa": "mmx"})
    with pytest.raises(ValueError, match="copy address together with copy_dtype"):
        native.adam_step(**{**args, "copy_dtype": native.DTYPE_BFLOAT16})
    with pytest.raises(ValueError, match="param address is null"):
        native.adam_step(**{**args, "param": 0})
    native.adam_step(**args)  # and the valid call runs


def test_plugin_registers_optimizers_and_reports_the_path() -> None:
    plugins = make_plugin_set(autoload=False, extra_plugins=(("zero", plugin),))
    components = load_components(plugins)
    param = torch.zeros(4, requires_grad=True)
    for name in ("CPUAdam", "deepspeedcpuadam", "cpu_adam"):
        optimizer = components.optimizers.get(name)([param], lr=1e-3, betas=[0.9, 0.95])
        assert isinstance(optimizer, CPUAdam)
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert isinstance(components.optimizers.get("CPUAdagrad")([param], lr=0.1), CPUAdagrad)
    with pytest.raises(ConfigError, match=r"optimizer 'CPUAdam': unknown parameter 'momentum'"):
        components.optimizers.get("CPUAdam")([param], momentum=0.9)
    with pytest.raises(ConfigError, match="amsgrad=true is not supported"):
        components.optimizers.get("CPUAdam")([param], amsgrad=True)

    lines = [line for _, result in plugins.call_each("ds_report_lines") for line in result or []]
    expected = f"cpu_adam: native, runs {NATIVE_PATHS[0]}" if NATIVE_PATHS else "cpu_adam: torch"
    assert any(line.startswith(expected) for line in lines), lines
