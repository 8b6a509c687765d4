"""The whole plugin contract of ds, in one module.

Every package of ds (core included) and every third-party plugin implements some of
these hooks and registers itself under the entry-point group ``ds.plugins``. Hooks run
when a run is composed (config load, ``ds.core.initialize``, ``ds report``), never per
training step: the engine resolves what the plugins offer once and keeps the chosen
callables.

Registration hooks receive a ``register`` callable rather than returning values, so one
plugin can register several components and the core can say which plugin registered a
name twice. Specs only ever grow by adding arguments; an implementation may accept any
subset of a spec's arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from ds.core.config import DsConfig

PROJECT_NAME = "ds"

_hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# -------------------------------------------------------------------------------------
# config sections
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_config_sections(register: Callable[..., None]) -> None:
    """Declare the top-level config keys this plugin owns.

    Call ``register(key, model, *, aliases=(), distribution=None)`` once per key:
    ``key`` is the top-level config key (``"zero_optimization"``), ``model`` a pydantic
    model class that validates that section (it should forbid unknown keys so typos are
    errors), ``aliases`` older spellings of the key that are accepted with a
    deprecation warning. A key registered by two plugins is an error naming both.

    Fires once per plugin manager, the first time a config is loaded.
    """


@_hookspec
def ds_validate_config(config: DsConfig, world_size: int) -> None:
    """Reject combinations of sections that nobody supports, at load time.

    Raise :class:`ds.core.errors.ConfigError` naming the keys that conflict and what to
    change (for example pipeline parallelism with ZeRO stage 3). Return nothing when the
    config is fine. Every implementation runs; the first error stops the load.

    Fires after every section has validated on its own and batch sizes are resolved.
    """


# -------------------------------------------------------------------------------------
# partitioners: how parameters, gradients and optimizer state spread over dp ranks
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_partitioners(register: Callable[..., None]) -> None:
    """Offer data-parallel partitioners.

    Call ``register(name, factory)``. ``factory(context)`` receives a
    :class:`ds.core.partition.PartitionContext` (module, config, mesh, communicator,
    optimizer factory, precision policy) and returns a
    :class:`ds.core.partition.Partitioner`, which owns the model's master weights,
    gradient synchronisation and the optimizer step. Core registers ``"data_parallel"``
    (replicated state, bucketed all-reduce); ds-zero registers ``"zero-1"``,
    ``"zero-2"`` and ``"zero-3"``.

    Fires once per plugin manager.
    """


@_hookspec(firstresult=True)
def ds_choose_partitioner(config: DsConfig) -> str | None:
    """Name the partitioner a config asks for, or None to let other plugins decide.

    The first non-None answer wins; core answers ``"data_parallel"`` last, so a plugin
    that owns the relevant section (ds-zero for ``zero_optimization.stage``) decides
    whenever its section is present.

    Fires once per ``ds.core.initialize``.
    """


# -------------------------------------------------------------------------------------
# communicators
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_communicators(register: Callable[..., None]) -> None:
    """Offer collective-communication backends.

    Call ``register(name, factory)``; ``factory(config)`` returns an object satisfying
    :class:`ds.core.comm.Communicator`. Core registers ``"torch"`` (torch.distributed on
    NCCL, RCCL or gloo with named-timeout watchdog). Plugins add compressed or
    hierarchical collectives; the config key ``communicator.backend`` picks one.

    Fires once per plugin manager.
    """


# -------------------------------------------------------------------------------------
# optimizers
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_optimizers(register: Callable[..., None]) -> None:
    """Offer optimizers by the name a config's ``optimizer.type`` uses.

    Call ``register(name, factory, *, aliases=())``. Names compare case-insensitively.
    ``factory(params, **optimizer_params)`` returns a ``torch.optim.Optimizer``; it
    receives DeepSpeed's parameter names (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ...) and should reject ones it does not know. Core registers
    torch's optimizers (Adam, AdamW, SGD, Adagrad, RMSprop); ds-zero adds CPU Adam;
    kernel packages add fused GPU Adam and LAMB.

    Fires once per plugin manager.
    """


# -------------------------------------------------------------------------------------
# kernel backends
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_kernel_backends(register: Callable[..., None]) -> None:
    """Offer implementations of ds's named ops (``rms_norm``, ``adam_step``, ...).

    Call ``register(backend)`` with a :class:`ds.core.kernels.KernelBackend`: it has a
    ``name``, a ``priority`` (higher is tried first; core's torch reference is always
    tried last), reports per op and device whether it can run and why not, and hands
    out the implementation. Checking availability must be cheap: never import a native
    extension just to answer it if the device is absent.

    Fires once per plugin manager.
    """


@_hookspec
def ds_define_kernel_ops(define: Callable[..., None]) -> None:
    """Declare new named ops beyond core's, so backends can implement them.

    Call ``define(name, reference, *, mutates_args=(), fake=None, backward=None,
    saves="inputs")`` where ``reference`` is a plain torch function that is the op's
    meaning; tests compare every backend against it. Its type hints give the op's
    schema (``torch.library.custom_op``; tensor arguments may not be keyword-only) and
    it becomes ``torch.ops.ds.<name>``. ``mutates_args`` names the arguments written in
    place. The reference run on fake tensors is the op's fake implementation for
    torch.compile; pass ``fake`` when it cannot run on fake tensors. ``backward`` is the
    reference of a second op, ``<name>_backward``, that backends may implement too; it
    receives the output's gradient followed by all of the op's arguments
    (``saves="inputs"``) or by the op's output and its non-tensor arguments
    (``saves="output"``), and returns one gradient per tensor argument. Defining a name
    another plugin defined is an error naming both. See
    :func:`ds.core.kernels.registry.define_op`.

    Fires once per plugin manager, before backends are consulted.
    """


# -------------------------------------------------------------------------------------
# model transforms
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_model_transforms(register: Callable[..., None]) -> None:
    """Offer rewrites of the user's model applied before partitioning.

    Call ``register(transform)`` with a :class:`ds.core.transforms.ModelTransform`
    (name, ``order``, ``applies(config)``, ``apply(module, context)``). Transforms run
    in ascending ``order``: tensor parallel (100), sequence parallel (200), expert
    parallel (300), pipeline split (400), compression (500), kernel injection (600),
    compilation (700).

    Fires once per plugin manager; each transform runs once per ``initialize``.
    """


# -------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------


@_hookspec
def ds_register_commands(register: Callable[..., None]) -> None:
    """Add subcommands to the ``ds`` command line.

    Call ``register(name, Command(help=..., configure=..., run=...))`` with a
    :class:`ds.core.cli.Command`: ``configure(parser)`` adds arguments to an
    ``argparse`` subparser, ``run(args) -> int`` executes and returns the exit status
    (``args.components`` holds the loaded components). A name registered twice, or the
    built-in ``report``, is an error naming the plugins.

    Fires once when ``ds`` starts.
    """


@_hookspec
def ds_report_lines() -> list[str] | None:
    """Return extra lines for ``ds report`` (versions of native libraries, devices).

    Every implementation's lines are printed under its plugin's name.
    """


def all_hook_names() -> list[str]:
    """The names of every hook spec, for the tests that check each is documented."""
    return sorted(name for name in globals() if name.startswith("ds_"))


__all__ = ["PROJECT_NAME", "all_hook_names"]
