"""Choosing, once per op and device type, which backend runs an op, and installing it.

Backends are ranked by descending ``priority`` (ties by name) with core's torch
reference always last. For each op and device type the first backend that implements
the op, reports itself available and hands out an implementation wins; every other
backend gets a recorded reason (unavailable and why, raised an error, does not implement
the op, or ranked below the winner). The winner is registered with torch.library for
that device type's dispatch key, so ``torch.ops.ds.<op>`` calls it directly afterwards:
selection happens at composition time (:func:`install_kernels`, or lazily on an op's
first call on a device type), never per call.

Where two or more kernel backends can run an op on a non-CPU device type, the ranking is
only a first guess: :mod:`ds.core.kernels.autotune` times them and the fastest runs the op
(per input dtype), its times recorded in the op's reason; ``DS_KERNEL_BACKEND`` and
``DS_KERNEL_MEASURE`` let an operator override that (see there).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ds.core.errors import DsError, PluginError
from ds.core.kernels.autotune import Candidate, Measurement, MeasurePolicy, decide, writes_arguments
from ds.core.kernels.backend import Availability, KernelBackend, TorchReferenceBackend
from ds.core.kernels.registry import DEFINE_OPTIONS, KernelOp, define_op, defined_ops, get_op, reset_to_first_call
from ds.core.plugins import Components, Registration, default_components


class KernelUnavailableError(DsError, RuntimeError):
    """No registered backend can run an op on a device type."""


@dataclass(frozen=True)
class Rejection:
    """A backend that does not run an op on a device type, and why."""

    backend: str
    reason: str


@dataclass(frozen=True)
class OpChoice:
    """Which backend runs ``op`` on ``device_type`` (None: none can) and why the others do not."""

    op: str
    device_type: str
    backend: str | None
    reason: str
    rejected: tuple[Rejection, ...]


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend as ``ds report`` lists it; ``problem`` is set when it is malformed."""

    name: str
    priority: int | None
    plugin: str
    problem: str | None = None


@dataclass
class KernelSelection:
    """The outcome of selection for one set of components, extendable to new device types."""

    components: Components
    backends: tuple[BackendInfo, ...]
    choices: dict[tuple[str, str], OpChoice] = field(default_factory=dict)
    policy: MeasurePolicy = field(default_factory=MeasurePolicy.from_env)
    _measured: dict[tuple[str, str], tuple[OpChoice, list[Measurement]]] = field(default_factory=dict, repr=False)
    _ranked: list[Registration[Any]] = field(default_factory=list, repr=False)
    _implementations: dict[tuple[str, str], Callable[..., Any]] = field(default_factory=dict, repr=False)

    @property
    def device_types(self) -> list[str]:
        return list(dict.fromkeys(device_type for _, device_type in self.choices))

    def choice(self, op: str, device_type: str) -> OpChoice:
        """The choice for ``op`` on ``device_type``, selecting it now if it was not yet."""
        if (op, device_type) not in self.choices:
            self._select(get_op(op), device_type)
        return self.choices[(op, device_type)]

    def implementation(self, op: str, device_type: str) -> Callable[..., Any]:
        """The callable that runs ``op`` on ``device_type``; it raises if no backend can."""
        self.choice(op, device_type)
        return self._implementations[(op, device_type)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for ``ds report --json`` and tools."""
        return {
            "backends": [asdict(info) for info in self.backends],
            "ops": [
                {
                    "op": c.op,
                    "device_type": c.device_type,
                    "backend": c.backend,
                    "reason": c.reason,
                    "rejected": [asdict(r) for r in c.rejected],
                }
                for c in self.choices.values()
            ],
        }

    def _select(self, op: KernelOp, device_type: str) -> None:
        rejected = [Rejection(info.name, info.problem) for info in self.backends if info.problem is not None]
        candidates: list[Candidate] = []
        consult_all = self.policy.measures(device_type) or op.name in self.policy.overrides
        for registration in self._ranked:
            if candidates and not consult_all:
                rejected.append(Rejection(registration.name,
                                          f"not consulted: {candidates[0].name!r} ranks higher and runs it"))
                continue
            outcome = _consult(registration.value, op.name, device_type)
            if isinstance(outcome, str):
                rejected.append(Rejection(registration.name, outcome))
            else:
                candidates.append(Candidate(registration.name, *outcome, backend=registration.value))
        key = (op.name, device_type)
        if not candidates:
            reason = "no registered kernel backend can run it"
            self.choices[key] = OpChoice(op.name, device_type, None, reason, tuple(rejected))
            self._implementations[key] = _unavailable_kernel(self.choices[key])
            return
        decision = decide(op.name, device_type, candidates, self.policy, mutates=writes_arguments(op),
                          on_measured=functools.partial(self._record_measurement, key))
        rejected += [Rejection(name, reason) for name, reason in decision.rejected]
        self.choices[key] = OpChoice(op.name, device_type, decision.backend, decision.reason, tuple(rejected))
        self._implementations[key] = decision.implementation
        if decision.measured is not None:
            self._measured[key] = (self.choices[key], [])
            decision.measured.measure_declared_input()

    def _record_measurement(self, key: tuple[str, str], measurement: Measurement) -> None:
        """Fold a timing into the op's choice: the first timed input names the backend, all are listed."""
        with _LOCK:
            unmeasured, measurements = self._measured[key]
            measurements.append(measurement)
            first = measurements[0]
            rejected = [*unmeasured.rejected]
            for m in measurements:
                rejected += [Rejection(name, f"slower on {m.input}: {ms:.3f} ms") for name, ms in m.times_ms[1:]]
                rejected += [Rejection(name, f"failed when timed on {m.input}: {error}") for name, error in m.failures]
            self.choices[key] = OpChoice(unmeasured.op, unmeasured.device_type, first.winner or unmeasured.backend,
                                         "; ".join(m.describe() for m in measurements), tuple(rejected))


def _consult(backend: KernelBackend, op: str, device_type: str) -> tuple[str, Callable[..., Any]] | str:
    """The backend's (reason, implementation) for the op, or the reason it cannot run it."""
    step = "ops"
    try:
        if op not in set(backend.ops()):
            return "does not implement this op"
        step = "availability"
        availability = backend.availability(op, device_type)
        if not isinstance(availability, Availability):
            return f"availability() returned {availability!r} instead of an Availability"
        if not availability.available:
            return f"unavailable: {availability.reason or 'no reason given'}"
        step = "implementation"
        implementation = backend.implementation(op, device_type)
    except Exception as exc:  # noqa: BLE001 - a broken backend is reported, never fatal
        return f"{step}() raised {type(exc).__name__}: {exc}"
    if not callable(implementation):
        return f"implementation() returned {implementation!r}, which is not callable"
    return availability.reason, implementation


def _unavailable_kernel(choice: OpChoice) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        reasons = "; ".join(f"{r.backend}: {r.reason}" for r in choice.rejected) or "no kernel backend is registered"
        raise KernelUnavailableError(
            f"no kernel backend can run ds op {choice.op!r} on {choice.device_type} ({reasons}). Install a "
            f"kernel package for {choice.device_type}, or keep ds-core's builtin plugin, which registers the "
            "torch reference backend."
        )

    return unavailable


def _rank(components: Components) -> tuple[tuple[BackendInfo, ...], list[Registration[Any]]]:
    """Usable backends in the order they are tried, and every backend's info in that order."""
    broken: list[BackendInfo] = []
    usable: list[Registration[Any]] = []
    for registration in components.kernel_backends:
        backend = registration.value
        priority = getattr(backend, "priority", None)
        if not isinstance(backend, KernelBackend):
            problem = f"is not a KernelBackend (needs name, priority, ops, availability, implementation): {backend!r}"
        elif not isinstance(priority, int):
            problem = f"priority must be an int, got {priority!r}"
        else:
            usable.append(registration)
            continue
        broken.append(BackendInfo(registration.name, priority if isinstance(priority, int) else None,
                                  registration.plugin, problem))
    usable.sort(key=lambda r: (isinstance(r.value, TorchReferenceBackend), -r.value.priority, r.name))
    infos = [BackendInfo(r.name, r.value.priority, r.plugin) for r in usable]
    return (*infos, *broken), usable


def define_plugin_ops(components: Components) -> list[KernelOp]:
    """Turn the ops plugins declared through ``ds_define_kernel_ops`` into torch ops."""
    defined = []
    for registration in components.kernel_ops:
        unknown = set(registration.options) - DEFINE_OPTIONS
        if unknown:
            raise PluginError(
                f"plugin {registration.plugin!r}: define({registration.name!r}, ...) got unknown options "
                f"{sorted(unknown)}; accepted: {sorted(DEFINE_OPTIONS)}"
            )
        defined.append(define_op(registration.name, registration.value, owner=registration.plugin,
                                 **registration.options))
    return defined


def local_device_types() -> list[str]:
    """``cpu`` plus this machine's accelerator type, if torch sees one."""
    device_types = ["cpu"]
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        device_types.append(accelerator.current_accelerator().type)
    elif accelerator is None and torch.cuda.is_available():
        device_types.append("cuda")
    return device_types


def plan_kernels(components: Components, device_types: Iterable[str] | None = None, *,
                 policy: MeasurePolicy | None = None) -> KernelSelection:
    """Select a backend for every defined op on each device type, without installing anything.

    ``policy`` (default: from the environment, see :mod:`ds.core.kernels.autotune`) says
    where competing backends are timed and which choices the operator forces.
    """
    import ds.core.kernels.ops  # noqa: F401 - defines core's ops

    define_plugin_ops(components)
    infos, ranked = _rank(components)
    policy = policy if policy is not None else MeasurePolicy.from_env()
    policy.check_overrides([op.name for op in defined_ops()], [info.name for info in infos])
    selection = KernelSelection(components, infos, policy=policy, _ranked=ranked)
    for device_type in device_types if device_types is not None else local_device_types():
        for op in defined_ops():
            selection.choice(op.name, device_type)
    return selection


_LOCK = threading.RLock()
_installed: KernelSelection | None = None
_registered_device_types: set[str] = set()


def install_kernels(
    components: Components | None = None, *, device_types: Iterable[str] | None = None,
    policy: MeasurePolicy | None = None,
) -> KernelSelection:
    """Select backends from ``components`` (default: the installed plugins) and install them.

    Afterwards ``torch.ops.ds.<op>`` on each of ``device_types`` (default: this
    machine's, see :func:`local_device_types`) runs the chosen implementation; any other
    device type selects from the same components on its first call. Calling it again
    replaces the previous selection everywhere.
    """
    global _installed
    with _LOCK:
        wanted = list(device_types) if device_types is not None else local_device_types()
        selection = plan_kernels(components or default_components(), wanted, policy=policy)
        stale = _registered_device_types - set(wanted)
        for op in defined_ops():
            reset_to_first_call(op, stale)
        for (op, device_type) in selection.choices:
            _register(selection, op, device_type)
        _installed = selection
        return selection


def installed_kernels() -> KernelSelection:
    """The selection in effect, installing the default one on first use."""
    with _LOCK:
        return _installed if _installed is not None else install_kernels()


def implementation_for(op: str, device_type: str) -> Callable[..., Any]:
    """Select and install ``op`` on ``device_type`` if needed; what an op's first call runs."""
    with _LOCK:
        selection = installed_kernels()
        if (op, device_type) not in selection.choices:
            selection.choice(op, device_type)
            _register(selection, op, device_type)
        return selection.implementation(op, device_type)


def reset_kernels() -> None:
    """Forget the selection; each op selects again on its next call (tests use this)."""
    global _installed
    with _LOCK:
        for op in defined_ops():
            reset_to_first_call(op, _registered_device_types)
        _installed = None


def _register(selection: KernelSelection, op: str, device_type: str) -> None:
    get_op(op).custom_op.register_kernel(device_type, selection.implementation(op, device_type))
    _registered_device_types.add(device_type)
