"""``load_config``: from a file, JSON text or dict to a validated, fully resolved DsConfig."""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ds.core.config.auto import (
    AutoContext,
    auto_resolver,
    is_auto,
    optimizer_learning_rate,
)
from ds.core.config.base import Visitor, join_path, valid_keys
from ds.core.config.batch import batch_sizes_from_config
from ds.core.config.keys import (
    check_mesh_pillars,
    check_top_level_keys,
    closest,
    drop_unsupported,
    rename_keys,
    rename_registered_aliases,
)
from ds.core.config.loader import read_config
from ds.core.config.root import DsConfig
from ds.core.config.schedules import SCHEDULE_PARAMS
from ds.core.config.sections import CORE_SECTIONS, MeshConfig, OptimizerConfig
from ds.core.config.validation import unresolved_auto_message, validate_section
from ds.core.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from torch import nn

    from ds.core.plugins import Components, Registry


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | DsConfig,
    *,
    world_size: int = 1,
    dp_world_size: int | None = None,
    model: nn.Module | None = None,
    components: Components | None = None,
    total_num_steps: int | None = None,
) -> DsConfig:
    """Read, check and resolve a DeepSpeed-format config.

    ``source`` is a JSON or YAML file path, JSON text, a dict, or an already loaded
    :class:`DsConfig` (returned as is). In order, the loader:

    1. parses the source (syntax errors name line and column);
    2. accepts old spellings of keys with a :class:`DeprecatedKeyWarning`, drops
       switched-off DeepSpeed settings ds does not support, and rejects switched-on ones,
       keys of pillars that are not installed (:class:`MissingPillarError` with the pip
       command) and unknown keys (with the closest valid spelling);
    3. derives the data-parallel size (``dp_world_size``, else ``world_size`` divided by
       ``mesh.pp * mesh.tp * mesh.sp``) and resolves the batch arithmetic;
    4. resolves ``"auto"`` values from ``world_size``, ``model`` (hidden size, parameter
       count, weight dtype) and ``total_num_steps``, and validates core's sections and
       every plugin section registered in ``components`` (default: the installed
       plugins), each plugin section by its own model;
    5. calls the ``ds_validate_config`` hook so plugins can reject combinations.

    Core's sections (:data:`CORE_SECTIONS`) are always present, whether or not core's
    builtin plugin has registered them, and are never validated twice. Every problem
    raises :class:`~ds.core.errors.ConfigError`; for a config file, its message starts
    with the file name.
    """
    if isinstance(source, DsConfig):
        return source
    if world_size < 1:
        raise ConfigError(f"world_size must be at least 1, got {world_size}.")
    if components is None:
        from ds.core.plugins import default_components

        components = default_components()
    raw, file = read_config(source)
    try:
        config = _resolve(raw, world_size, dp_world_size, model, components, total_num_steps)
        components.hook.ds_validate_config(config=config, world_size=world_size)
    except ConfigError as exc:
        if file is not None:
            exc.args = (f"{file}: {exc}",)
        raise
    return config


def _resolve(raw: dict[str, Any], world_size: int, dp_world_size: int | None, model: nn.Module | None,
             components: Components, total_num_steps: int | None) -> DsConfig:
    registry = components.config_sections
    plugin_models = plugin_section_models(registry)
    data = rename_keys(DsConfig, rename_registered_aliases(copy.deepcopy(raw), registry), "")
    drop_unsupported(data, plugin_models)
    check_top_level_keys(data, valid_keys(DsConfig), registry, components.plugins)

    context = AutoContext.from_model(model, world_size=world_size, total_num_steps=total_num_steps)
    mesh = validate_section(MeshConfig, data.get("mesh", {}), "mesh", _visitors(context))
    check_mesh_pillars(mesh.model_dump(), registry, components.plugins)
    dp = mesh.data_parallel_size(world_size)  # checks the mesh fits the world even when dp is given
    if dp_world_size is not None:
        dp = dp_world_size
    context = replace(context, dp_world_size=dp, learning_rate=optimizer_learning_rate(data))
    visitors = _visitors(context)

    data.update(batch_sizes_from_config(data, dp).as_config())
    if isinstance(data.get("scheduler"), dict):
        _resolve_schedule_params(data["scheduler"], visitors)
    core_data = {key: value for key, value in data.items() if key not in plugin_models}
    config = validate_section(DsConfig, core_data, "", visitors)
    _reject_unresolved_auto(config.model_dump(), "")
    _check_optimizer(config.optimizer, components.optimizers)
    _check_registered(config.communicator.backend, "communicator.backend", components.communicators)

    sections = {key: validate_section(model_cls, data[key], key, visitors)
                for key, model_cls in plugin_models.items() if key in data}
    config._attach(raw=raw, sections=sections, world_size=world_size, dp_world_size=dp)
    return config


def _visitors(context: AutoContext) -> tuple[Visitor, ...]:
    return (rename_keys, auto_resolver(context))


def plugin_section_models(registry: Registry[Any]) -> dict[str, type[BaseModel]]:
    """The sections plugins registered, without core's own (registered or not)."""
    core_keys = valid_keys(DsConfig)
    models: dict[str, type[BaseModel]] = {}
    for registration in registry:
        key, model = registration.name, registration.value
        if CORE_SECTIONS.get(key) is model:
            continue
        if key in core_keys:
            raise PluginError(
                f"plugin {registration.plugin!r} registers config key {key!r}, which ds core owns. "
                "Register the section under another key."
            )
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise PluginError(
                f"plugin {registration.plugin!r} registered config section {key!r} as {model!r}; "
                "register a pydantic model class (a subclass of ds.core.config.SectionModel)."
            )
        models[key] = model
    return models


def _resolve_schedule_params(scheduler: dict[str, Any], visitors: tuple[Visitor, ...]) -> None:
    """Check ``scheduler.params`` against its schedule and keep only what the user set."""
    kind, params = scheduler.get("type"), scheduler.get("params", {})
    schedule = next((name for name in SCHEDULE_PARAMS if isinstance(kind, str) and name.lower() == kind.lower()),
                    None)
    if schedule is None or not isinstance(params, dict):
        return  # SchedulerConfig reports the bad type or params
    checked = validate_section(SCHEDULE_PARAMS[schedule], params, "scheduler.params", visitors)
    scheduler["params"] = checked.model_dump(exclude_none=True)


def _reject_unresolved_auto(value: Any, path: str) -> None:
    if is_auto(value):
        raise ConfigError(unresolved_auto_message(path))
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_unresolved_auto(item, join_path(path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_unresolved_auto(item, join_path(path, index))


def _check_registered(name: str, path: str, registry: Registry[Any]) -> None:
    """Reject a component name no installed plugin registered.

    An empty registry means nothing of that kind is installed in this plugin set (a
    test's bare one), so there is nothing to check against.
    """
    if len(registry) == 0 or name in registry:
        return
    suggestion = closest(name, registry.names())
    hint = f"Did you mean {suggestion!r}? " if suggestion else ""
    raise ConfigError(
        f"'{path}' is {name!r}, which no installed plugin offers. {hint}"
        f"Installed: {', '.join(sorted(registry.names()))}."
    )


def _check_optimizer(optimizer: OptimizerConfig | None, registry: Registry[Any]) -> None:
    """Check the optimizer's name and, where its factory lists them, its parameter names."""
    if optimizer is None:
        return
    _check_registered(optimizer.type, "optimizer.type", registry)
    if optimizer.type not in registry:
        return
    try:
        signature = inspect.signature(registry.get(optimizer.type))
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in signature.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return
    accepted = [name for name, p in signature.parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "params"]
    for key in optimizer.params:
        if key not in accepted:
            suggestion = closest(key, accepted)
            hint = f"did you mean '{suggestion}'?" if suggestion else f"it accepts {', '.join(accepted)}."
            raise ConfigError(
                f"unknown key 'optimizer.params.{key}'; optimizer {optimizer.type!r} has no such "
                f"parameter; {hint} Fix the spelling or remove the key."
            )
