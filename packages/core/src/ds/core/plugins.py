"""Plugin loading and the registries that plugins fill.

A :class:`PluginSet` is built by :func:`make_plugin_set` (a factory, so every test can
get a fresh one): core's built-in plugin is registered first, which makes it the last
one pluggy calls (lowest priority), then every entry point of the group ``ds.plugins``.
A plugin that fails to import is recorded with its error and skipped, so one broken
third-party package never breaks ``import ds.core``.

Operators control loading with environment variables:

* ``DS_DISABLE_PLUGIN_AUTOLOAD=1``: load only core plus the plugins named in
  ``DS_PLUGINS`` (comma separated entry-point names, e.g. ``zero,kernels-cuda``).
* ``DS_PLUGINS`` without the first variable: an allowlist; other plugins are skipped.
* ``DS_TRACE_HOOKS=1``: print every hook call and its result.

:class:`Components` calls each registration hook once per plugin with a ``register``
callable bound to that plugin's name, so a duplicate name is reported with both owners.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from difflib import get_close_matches
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import pluggy

from ds.core import hookspecs
from ds.core.errors import PluginError

ENTRY_POINT_GROUP = "ds.plugins"
CORE_PLUGIN_NAME = "core"
DISABLE_AUTOLOAD_ENV = "DS_DISABLE_PLUGIN_AUTOLOAD"
ALLOWLIST_ENV = "DS_PLUGINS"
TRACE_ENV = "DS_TRACE_HOOKS"

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as ``ds report`` shows it."""

    name: str
    module: str
    distribution: str | None
    version: str | None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    module: str
    distribution: str | None
    error: str


@dataclass
class PluginSet:
    """A pluggy manager plus what was loaded into it and what failed."""

    manager: pluggy.PluginManager
    loaded: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    def call_each(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call every implementation of a hook separately, yielding (plugin, result).

        Registration hooks need to know which plugin is registering; pluggy's normal
        call merges results and hides the caller. The per-plugin ``register`` keyword is
        built by the caller when ``kwargs`` holds a factory under ``_bind``.
        """
        hook = getattr(self.manager.hook, hook_name)
        bind: Callable[[str], dict[str, Any]] | None = kwargs.pop("_bind", None)
        for impl in hook.get_hookimpls():  # registration order: core first, then plugins
            call_kwargs = dict(kwargs)
            if bind is not None:
                call_kwargs.update(bind(impl.plugin_name))
            args = {name: call_kwargs[name] for name in impl.argnames if name in call_kwargs}
            yield impl.plugin_name, impl.function(**args)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def make_plugin_set(
    *,
    autoload: bool | None = None,
    allow: set[str] | None = None,
    extra_plugins: tuple[tuple[str, object], ...] = (),
) -> PluginSet:
    """Build a fresh plugin manager with core and the installed plugins loaded.

    ``autoload`` and ``allow`` default to the environment variables described in the
    module docstring; ``extra_plugins`` registers ``(name, module_or_object)`` pairs
    directly (tests and notebooks use it for plugins that are not installed).
    """
    from ds.core import builtin

    if autoload is None:
        autoload = not _env_flag(DISABLE_AUTOLOAD_ENV)
    if allow is None:
        allow = _env_list(ALLOWLIST_ENV)
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    plugins = PluginSet(manager)
    manager.register(builtin, name=CORE_PLUGIN_NAME)
    plugins.loaded.append(_info(CORE_PLUGIN_NAME, builtin.__name__, "ds-core"))

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name == CORE_PLUGIN_NAME:
            continue
        wanted = (allow is None and autoload) or (allow is not None and ep.name in allow)
        if not wanted:
            continue
        distribution = ep.dist.name if ep.dist is not None else None
        try:
            module = ep.load()
            manager.register(module, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must never break ds
            failure = PluginFailure(ep.name, ep.value, distribution, f"{type(exc).__name__}: {exc}")
            plugins.failures.append(failure)
            warnings.warn(
                f"ds plugin {ep.name!r} ({ep.value}, from {distribution}) failed to load and "
                f"was skipped: {failure.error}. Reinstall it, or set {ALLOWLIST_ENV} to "
                "the plugins you want.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        plugins.loaded.append(_info(ep.name, ep.value, distribution))

    for name, plugin in extra_plugins:
        manager.register(plugin, name=name)
        plugins.loaded.append(_info(name, getattr(plugin, "__name__", repr(plugin)), None))

    if _env_flag(TRACE_ENV):
        manager.trace.root.setwriter(print)
        manager.enable_tracing()
    return plugins


def _info(name: str, module: str, distribution: str | None) -> PluginInfo:
    version = None
    if distribution is not None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version(distribution)
        except PackageNotFoundError:
            version = None
    return PluginInfo(name, module, distribution, version)


@dataclass(frozen=True)
class Registration(Generic[T]):
    """A named component and the plugin that registered it."""

    name: str
    value: T
    plugin: str
    options: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Named components of one kind; duplicates are errors that name both plugins."""

    def __init__(self, kind: str, *, case_sensitive: bool = True) -> None:
        self.kind = kind
        self._case_sensitive = case_sensitive
        self._entries: dict[str, Registration[T]] = {}
        self._aliases: dict[str, str] = {}

    def _key(self, name: str) -> str:
        return name if self._case_sensitive else name.lower()

    def add(self, name: str, value: T, plugin: str, *, aliases: tuple[str, ...] = (), **options: Any) -> None:
        for key in (name, *aliases):
            existing = self._lookup(key)
            if existing is not None:
                raise PluginError(
                    f"{self.kind} {key!r} is registered twice: by plugin {existing.plugin!r} "
                    f"and by plugin {plugin!r}. Uninstall one of them or disable it with "
                    f"{ALLOWLIST_ENV}."
                )
        self._entries[self._key(name)] = Registration(name, value, plugin, dict(options))
        for alias in aliases:
            self._aliases[self._key(alias)] = self._key(name)

    def _lookup(self, name: str) -> Registration[T] | None:
        key = self._key(name)
        key = self._aliases.get(key, key)
        return self._entries.get(key)

    def registration(self, name: str) -> Registration[T]:
        found = self._lookup(name)
        if found is None:
            choices = [r.name for r in self._entries.values()]
            close = get_close_matches(name, choices, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"no {self.kind} named {name!r}.{hint} Known: {', '.join(sorted(choices))}.")
        return found

    def get(self, name: str) -> T:
        return self.registration(name).value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[Registration[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return [r.name for r in self._entries.values()]


@dataclass
class Components:
    """Everything the loaded plugins registered, collected once per plugin set."""

    plugins: PluginSet
    config_sections: Registry[Any]
    partitioners: Registry[Callable[..., Any]]
    communicators: Registry[Callable[..., Any]]
    optimizers: Registry[Callable[..., Any]]
    kernel_ops: Registry[Callable[..., Any]]
    kernel_backends: Registry[Any]
    model_transforms: Registry[Any]
    commands: Registry[Any]

    @property
    def hook(self) -> Any:
        """The pluggy hook relay, for the few non-registration hooks."""
        return self.plugins.manager.hook


def _collect(plugins: PluginSet, hook_name: str, registry: Registry[Any], arg: str = "register",
             named: bool = True) -> None:
    def bind(plugin: str) -> dict[str, Any]:
        def register(*args: Any, **options: Any) -> None:
            if named:
                name, value, *rest = args
            else:
                (value, *rest) = args
                name = value.name
            if rest:
                raise PluginError(f"plugin {plugin!r}: {hook_name} register() got extra positional arguments {rest!r}")
            registry.add(name, value, plugin, **options)

        return {arg: register}

    for _ in plugins.call_each(hook_name, _bind=bind):
        pass


def load_components(plugins: PluginSet | None = None) -> Components:
    """Run every registration hook once and return the filled registries."""
    plugins = plugins or make_plugin_set()
    components = Components(
        plugins=plugins,
        config_sections=Registry("config section"),
        partitioners=Registry("partitioner"),
        communicators=Registry("communicator"),
        optimizers=Registry("optimizer", case_sensitive=False),
        kernel_ops=Registry("kernel op"),
        kernel_backends=Registry("kernel backend"),
        model_transforms=Registry("model transform"),
        commands=Registry("command"),
    )
    _collect(plugins, "ds_register_config_sections", components.config_sections)
    _collect(plugins, "ds_register_partitioners", components.partitioners)
    _collect(plugins, "ds_register_communicators", components.communicators)
    _collect(plugins, "ds_register_optimizers", components.optimizers)
    _collect(plugins, "ds_define_kernel_ops", components.kernel_ops, arg="define")
    _collect(plugins, "ds_register_kernel_backends", components.kernel_backends, named=False)
    _collect(plugins, "ds_register_model_transforms", components.model_transforms, named=False)
    _collect(plugins, "ds_register_commands", components.commands)
    return components


@functools.cache
def default_components() -> Components:
    """The process-wide components from the installed plugins, built on first use."""
    return load_components(make_plugin_set())


def accepted_arguments(func: Callable[..., Any]) -> set[str]:
    """Keyword names a factory accepts, so errors can list them."""
    return {p.name for p in inspect.signature(func).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
