"""Validate one config section and report pydantic's findings as errors users can act on.

Every message names the full key path and says what to change; pydantic's own dump
(error codes, URLs, union branch names) never reaches the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ds.core.config.auto import is_auto
from ds.core.config.base import Visitor, join_path, model_at, valid_keys, walk_models
from ds.core.config.keys import unknown_key_message
from ds.core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

_SECTION_TYPE_ERRORS = {"model_type", "model_attributes_type", "dict_type"}


def validate_section(model: type[ModelT], value: Any, path: str, visitors: Sequence[Visitor]) -> ModelT:
    """Rewrite ``value`` with ``visitors`` (renames, ``"auto"``), then validate it as ``model``.

    ``path`` is where the section sits in the config (``""`` for the root).
    """
    if isinstance(value, dict):
        value = walk_models(model, value, path, visitors)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, model, value, path)) from None


def describe_errors(exc: ValidationError, model: type[BaseModel], data: Any, path: str) -> str:
    """One line per problem, at most one per key path."""
    messages: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        keys = _keys_in_data(error, data)
        where = _join(path, keys)
        messages.setdefault(where, _describe(error, model, keys, path))
    if len(messages) == 1:
        return next(iter(messages.values()))
    return f"{len(messages)} problems in the config:\n" + "\n".join(f"  - {m}" for m in messages.values())


def _join(path: str, keys: Sequence[str | int]) -> str:
    for key in keys:
        path = join_path(path, key)
    return path


def _keys_in_data(error: ErrorDetails, data: Any) -> list[str | int]:
    """The part of pydantic's location that is made of config keys.

    Locations also name union branches and validator functions; following the location
    through the data keeps only what the user wrote (plus the key that is missing).
    """
    keys: list[str | int] = []
    current = data
    for part in error["loc"]:
        in_dict = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_dict or in_list:
            current = current[part]
        else:
            if error["type"] == "missing" and isinstance(part, str):
                keys.append(part)
            break
        keys.append(part)
    return keys


def unresolved_auto_message(where: str) -> str:
    return f"'{where}' is \"auto\", but ds has no rule to resolve it for this key; set a value."


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(error: ErrorDetails, model: type[BaseModel], keys: list[str | int], path: str) -> str:
    where = _join(path, keys)
    kind, value, message = error["type"], error.get("input"), error["msg"]
    if kind == "extra_forbidden" and keys:
        parent = model_at(model, keys[:-1])
        return unknown_key_message(_join(path, keys[:-1]), str(keys[-1]), valid_keys(parent) if parent else [])
    if kind == "missing":
        return f"'{where}' is required; add it to your config."
    if is_auto(value):
        return unresolved_auto_message(where)
    if kind == "int_from_float":
        return (f"'{where}' must be a whole number, got {_show(value)}. Numbers like 5e8 are fine when "
                "they are whole; change this one to an integer.")
    if kind in _SECTION_TYPE_ERRORS:
        return f"'{where}' must be a section (an object of keys), got {_show(value)}."
    if kind == "value_error":
        reason = message.removeprefix("Value error, ")
        return f"'{where}': {reason}." if where else f"{reason}."
    reason = "it" + message[len("Input"):] if message.startswith("Input") else message[:1].lower() + message[1:]
    return f"'{where}' = {_show(value)} is invalid: {reason}. Change it in your config."
