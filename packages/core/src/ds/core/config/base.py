"""What every config section model shares, core's and plugins' alike.

A config section is a pydantic model. Subclassing :class:`SectionModel` gives a section
what users of DeepSpeed-format files expect:

* unknown keys are errors that name the full key path and the closest valid key;
* old spellings listed in ``renamed_keys`` are accepted, with a
  :class:`DeprecatedKeyWarning` naming the new spelling;
* ``"auto"`` is accepted for every field (see :mod:`ds.core.config.auto`).

The loader applies renames and ``"auto"`` before pydantic sees the data, walking the
model tree with :func:`walk_models`, so every message can name the full key path
(``zero_optimization.offload_optimizer.device``), which a pydantic validator cannot.
"""

from __future__ import annotations

import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo


class DeprecatedKeyWarning(UserWarning):
    """A config used an old spelling of a key.

    A ``UserWarning`` rather than a ``DeprecationWarning`` because the person who must act
    is whoever edits the config file, and Python hides ``DeprecationWarning`` from them.
    """


class SectionModel(BaseModel):
    """Base of config sections: strict keys, old spellings renamed, ``"auto"`` resolved.

    ``renamed_keys`` maps an old key of this section to its new key. Values that need
    converting, not just renaming, belong in the model's own ``mode="before"`` validator
    (call :func:`warn_renamed` there so users see the same warning).
    """

    model_config = ConfigDict(extra="forbid")

    renamed_keys: ClassVar[dict[str, str]] = {}


Visitor = Callable[[type[BaseModel], dict[str, Any], str], dict[str, Any]]
"""Rewrites one level of config data for a model: ``(model, data, path) -> data``."""


def join_path(path: str, key: str | int) -> str:
    """``"zero_optimization"`` + ``"stage"`` -> ``"zero_optimization.stage"``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def warn_renamed(old_path: str, new_path: str) -> None:
    """Tell the user an old spelling was accepted and what to write instead.

    The warning points at the first caller outside this package (the user's
    ``load_config`` call), wherever in the loader the rename happened.
    """
    frame, stacklevel = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(__package__ or ""):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(
        f"config key '{old_path}' is a deprecated spelling; ds read it as '{new_path}'. "
        f"Rename it to '{new_path}' in your config.",
        DeprecatedKeyWarning,
        stacklevel=stacklevel,
    )


def config_key(name: str, field: FieldInfo) -> str:
    """The key a field is written as in a config file (its alias when it has one)."""
    return field.alias or name


def field_for_key(model: type[BaseModel], key: str) -> FieldInfo | None:
    """The field that a config key sets, or None when the model has no such key."""
    for name, field in model.model_fields.items():
        if config_key(name, field) == key:
            return field
    return None


def valid_keys(model: type[BaseModel]) -> list[str]:
    """Every key a section accepts, in declaration order."""
    return [config_key(name, field) for name, field in model.model_fields.items()]


_WRAPPERS = (typing.Union, types.UnionType, typing.Annotated)


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds directly (``X``, ``X | None``, ``Annotated[X, ...]``).

    Containers (``dict[str, X]``, ``list[X]``) are not sections of the config tree, so
    they are not looked into.
    """
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in _WRAPPERS:
        for arg in typing.get_args(annotation):
            found = submodel(arg)
            if found is not None:
                return found
    return None


def model_at(model: type[BaseModel], keys: Sequence[str | int]) -> type[BaseModel] | None:
    """The section model found by following ``keys`` down from ``model``."""
    current: type[BaseModel] | None = model
    for key in keys:
        if current is None or not isinstance(key, str):
            return None
        field = field_for_key(current, key)
        current = submodel(field.annotation) if field is not None else None
    return current


def walk_models(
    model: type[BaseModel], data: dict[str, Any], path: str, visitors: Sequence[Visitor]
) -> dict[str, Any]:
    """Apply ``visitors`` to ``data`` and to every nested section, top down.

    Each visitor sees one level (a dict meant for one model) and returns it rewritten;
    nested sections are visited after their parent, so a key renamed at one level is
    walked under its new name.
    """
    for visit in visitors:
        data = visit(model, data, path)
    walked: dict[str, Any] = {}
    for key, value in data.items():
        field = field_for_key(model, key)
        child = submodel(field.annotation) if field is not None else None
        if child is not None and isinstance(value, dict):
            value = walk_models(child, value, join_path(path, key), visitors)
        walked[key] = value
    return walked
