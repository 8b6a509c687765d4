"""Choosing between backends that can all run an op by timing them, and the operator's overrides.

Priority says which backend *should* be faster; on a given card it may not be (a Triton
norm can beat a hand-written CUDA one on one GPU and lose on the next). So when more than
one kernel backend can run an op on a device type, selection does not trust the ranking:
it times each of them on the same input and keeps the fastest, once per process per op,
device type and input dtypes, and records the times in the op's reason, which ``ds report``
prints::

    rms_norm on cuda: cuda-triton (cuda-triton: 0.210 ms, cuda-native: 0.240 ms -> cuda-triton
    on bfloat16 [8192, 4096], the benchmark input)

The input is the first one a contender declares through an optional
``benchmark_input(op, device_type) -> tuple | None`` method (positional arguments of a
typical call), timed as soon as the op is selected; every other combination of input
dtypes is timed on the first real call that has it, on that call's own arguments. An op
that writes its arguments (``adam_step``) is timed only on a declared input, never on a
caller's tensors; without one it keeps the ranking. Core's torch reference is the fallback,
not a contender: a backend that registers a kernel claims to beat plain torch, and the
benchmarks check that claim. Each contender runs once untimed (compiling, autotuning), then
in rounds within a small time budget, synchronizing the device; the best round counts.

Never measured: CPU (a shared, noisy host where ops are rarely the bottleneck; the ranking
decides), and calls made while a CUDA graph is being captured (the ranking decides for that
call only). Operators decide instead of the clock with environment variables read when
kernels are selected:

* ``DS_KERNEL_BACKEND=rms_norm=cuda-native,woq_matmul=cuda-triton`` runs each named op
  on the named backend wherever that backend can run it (elsewhere selection proceeds as
  usual, and the reason says the request could not be met);
* ``DS_KERNEL_MEASURE=0`` turns timing off: the ranking alone decides.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ds.core.errors import ConfigError
from ds.core.kernels.backend import TorchReferenceBackend
from ds.core.kernels.registry import KernelOp

OVERRIDE_ENV = "DS_KERNEL_BACKEND"
MEASURE_ENV = "DS_KERNEL_MEASURE"


@dataclass(frozen=True)
class MeasurePolicy:
    """When selection times competing backends, how long it may spend, and what the operator forces.

    ``measure_cpu`` exists for tests: CPU backends are otherwise never timed.
    ``budget_s`` bounds the timed calls of one contender on one input (the untimed first
    call comes on top).
    """

    measure: bool = True
    measure_cpu: bool = False
    overrides: Mapping[str, str] = field(default_factory=dict)
    budget_s: float = 0.03
    rounds: int = 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> MeasurePolicy:
        measure = environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        return cls(measure=measure, overrides=parse_overrides(environ.get(OVERRIDE_ENV, "")))

    def measures(self, device_type: str) -> bool:
        return self.measure and (device_type != "cpu" or self.measure_cpu)

    def check_overrides(self, ops: Iterable[str], backends: Iterable[str]) -> None:
        """Fail, naming the valid choices, when an override names an unknown op or backend."""
        known_ops, known_backends = set(ops), set(backends)
        for op, backend in self.overrides.items():
            if op not in known_ops:
                raise ConfigError(f"{OVERRIDE_ENV} names the op {op!r}, which is not defined; defined ops: "
                                  f"{', '.join(sorted(known_ops))}")
            if backend not in known_backends:
                raise ConfigError(f"{OVERRIDE_ENV} asks for backend {backend!r} for {op!r}, which is not registered; "
                                  f"registered backends: {', '.join(sorted(known_backends))}")


def parse_overrides(text: str) -> dict[str, str]:
    """``"op=backend,op=backend"`` as a dict; a malformed entry is an error that shows the form."""
    overrides: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        op, sep, backend = (s.strip() for s in entry.partition("="))
        if not (sep and op and backend):
            raise ConfigError(f"{OVERRIDE_ENV} entry {entry!r} is not op=backend; write for example "
                              f"{OVERRIDE_ENV}=rms_norm=cuda-native,woq_matmul=cuda-triton")
        overrides[op] = backend
    return overrides


@dataclass(frozen=True)
class Candidate:
    """A backend that reported itself able to run the op, with its reason and implementation."""

    name: str
    reason: str
    implementation: Callable[..., Any]
    backend: Any

    @property
    def is_fallback(self) -> bool:
        return isinstance(self.backend, TorchReferenceBackend)


@dataclass(frozen=True)
class Measurement:
    """The times of every contender on one input, fastest first, and the ones that failed."""

    input: str
    times_ms: tuple[tuple[str, float], ...]
    failures: tuple[tuple[str, str], ...] = ()

    @property
    def winner(self) -> str | None:
        return self.times_ms[0][0] if self.times_ms else None

    def describe(self) -> str:
        times = ", ".join(f"{name}: {ms:.3f} ms" for name, ms in self.times_ms)
        failed = "".join(f"; {name} failed: {error}" for name, error in self.failures)
        return f"{times} -> {self.winner} on {self.input}{failed}"


@dataclass(frozen=True)
class Decision:
    """What selection installs for an op on a device type before any measurement."""

    backend: str
    reason: str
    implementation: Callable[..., Any]
    rejected: tuple[tuple[str, str], ...]
    measured: MeasuredKernel | None = None


def decide(op: str, device_type: str, candidates: list[Candidate], policy: MeasurePolicy, *, mutates: bool,
           on_measured: Callable[[Measurement], None]) -> Decision:
    """Pick among ``candidates`` (in rank order, at least one) by override, measurement or rank."""
    wanted = policy.overrides.get(op)
    note = ""
    if wanted is not None:
        chosen = next((c for c in candidates if c.name == wanted), None)
        if chosen is not None:
            others = tuple((c.name, f"{OVERRIDE_ENV} chose {wanted!r}") for c in candidates if c is not chosen)
            return Decision(chosen.name, f"{OVERRIDE_ENV} chose it ({chosen.reason})", chosen.implementation, others)
        note = f"; {OVERRIDE_ENV} asks for {wanted!r}, which cannot run it here"
    contenders = [c for c in candidates if not c.is_fallback]
    if len(contenders) < 2 or not policy.measures(device_type):
        first = candidates[0]
        others = tuple((c.name, f"ranks below {first.name!r}, which runs it") for c in candidates[1:])
        return Decision(first.name, first.reason + note, first.implementation, others)
    fallbacks = tuple((c.name, "fallback, not timed: a kernel backend runs it") for c in candidates if c.is_fallback)
    kernel = MeasuredKernel(op, device_type, contenders, policy, mutates=mutates, on_measured=on_measured)
    names = ", ".join(c.name for c in contenders)
    reason = f"fastest of {names} once timed on the first call per input dtype (not called yet){note}"
    return Decision(contenders[0].name, reason, kernel, fallbacks, kernel)


class MeasuredKernel:
    """Runs an op with the contender that was fastest for the call's input dtypes, timing each combination once."""

    def __init__(self, op: str, device_type: str, contenders: list[Candidate], policy: MeasurePolicy, *,
                 mutates: bool, on_measured: Callable[[Measurement], None]) -> None:
        self.op, self.device_type, self.contenders, self.policy = op, device_type, contenders, policy
        self.mutates, self.on_measured = mutates, on_measured
        self.fastest: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        implementation = self.fastest.get(_dtype_key(args, kwargs))
        if implementation is None:
            implementation = self._choose(args, kwargs, "the first call's input")
        return implementation(*args, **kwargs)

    def measure_declared_input(self) -> None:
        """Time the contenders now on the first benchmark input one of them declares, if any."""
        for contender in self.contenders:
            declare = getattr(contender.backend, "benchmark_input", None)
            args = declare(self.op, self.device_type) if declare is not None else None
            if args is not None:
                self._choose(tuple(args), {}, "the benchmark input", on_real_call=False)
                return

    def _choose(self, args: tuple[Any, ...], kwargs: dict[str, Any], source: str, *,
                on_real_call: bool = True) -> Callable[..., Any]:
        key = _dtype_key(args, kwargs)
        ranked_first = self.contenders[0].implementation
        if (on_real_call and self.mutates) or _capturing(self.device_type):
            if not _capturing(self.device_type):
                self.fastest[key] = ranked_first
            return ranked_first
        with self._lock:
            if key in self.fastest:
                return self.fastest[key]
            measurement = self._measure(args, kwargs, f"{_describe(args, kwargs)}, {source}")
            by_name = {c.name: c.implementation for c in self.contenders}
            self.fastest[key] = by_name[measurement.winner] if measurement.winner else ranked_first
        self.on_measured(measurement)
        return self.fastest[key]

    def _measure(self, args: tuple[Any, ...], kwargs: dict[str, Any], described: str) -> Measurement:
        times: list[tuple[str, float]] = []
        failures: list[tuple[str, str]] = []
        for contender in self.contenders:
            try:
                seconds = time_call(contender.implementation, args, kwargs, self.device_type, self.policy)
            except Exception as exc:  # noqa: BLE001 - a contender that fails loses, with the reason recorded
                failures.append((contender.name, f"{type(exc).__name__}: {exc}"))
            else:
                times.append((contender.name, seconds * 1e3))
        return Measurement(described, tuple(sorted(times, key=lambda t: t[1])), tuple(failures))


def writes_arguments(op: KernelOp) -> bool:
    """Whether the op mutates any of its arguments (then a caller's tensors are never used for timing)."""
    schema = op.custom_op._opoverload._schema
    return any(arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments)


def time_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], device_type: str,
              policy: MeasurePolicy) -> float:
    """Seconds per call of ``fn(*args, **kwargs)``, device work included: the best of a few rounds."""
    synchronize = _synchronizer(device_type)
    fn(*args, **kwargs)  # untimed: compilation, autotuning, caches
    synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    synchronize()
    single = max(time.perf_counter() - start, 1e-7)
    reps = max(1, min(1000, int(policy.budget_s / policy.rounds / single)))
    best = math.inf
    for _ in range(policy.rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn(*args, **kwargs)
        synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def _synchronizer(device_type: str) -> Callable[[], None]:
    if device_type == "cpu":
        return lambda: None
    module = getattr(torch, device_type, None)
    synchronize = getattr(module, "synchronize", None)
    return synchronize if callable(synchronize) else torch.accelerator.synchronize


def _capturing(device_type: str) -> bool:
    return device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else (value,)
        found += [item for item in items[:1] if isinstance(item, torch.Tensor)]
    return found


def _dtype_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The dtypes of the tensor arguments (the first of a list) and any dtype arguments."""
    dtypes = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.dtype)]
    return (*(t.dtype for t in _tensors(args, kwargs)), *dtypes)


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    tensors = _tensors(args, kwargs)
    if not tensors:
        return "an input without tensors"
    first = tensors[0]
    return f"{str(first.dtype).removeprefix('torch.')} {list(first.shape)}"
