"""Reading a config from wherever the user keeps it: a JSON or YAML file, JSON text, a dict.

Syntax errors name the line and column. Two choices keep files that work with DeepSpeed
working here:

* duplicate keys are errors (DeepSpeed rejects them too; the last one silently winning
  is how a setting gets lost);
* in YAML, ``5e8`` and ``1e-5`` are numbers. YAML 1.1, which PyYAML follows, reads
  exponents without a decimal point as strings, which turns ``lr: 1e-5`` into text.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ds.core.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")

_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _ConfigYamlLoader(yaml.SafeLoader):
    """Safe YAML with exponent numbers and duplicate-key errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ConfigError(f"duplicate key {key!r} in the JSON config. Keep one of them.")
        result[key] = value
    return result


def parse_json(text: str, origin: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid JSON in {origin} at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
            "Fix the syntax there (JSON allows no comments or trailing commas)."
        ) from None


def parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigYamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"invalid YAML in {origin}{where}: {problem}. Fix the syntax there.") from None


def read_config(source: str | os.PathLike[str] | dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Return the config as a fresh dict, and the file it came from (None for text or a dict).

    A string is JSON text when it starts with ``{``, otherwise a file path; files ending
    in ``.yaml`` or ``.yml`` are YAML, all others JSON.
    """
    if isinstance(source, dict):
        return _mapping(copy.deepcopy(source), "the config dict"), None
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return _mapping(parse_json(source, "the JSON text"), "the JSON text"), None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a config must be a file path, JSON text or a dict, got {type(source).__name__}.")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist. Check the path.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}.") from None
    origin = str(path)
    data = parse_yaml(text, origin) if path.suffix.lower() in YAML_SUFFIXES else parse_json(text, origin)
    return _mapping(data, origin), origin


def _mapping(data: Any, origin: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin} must hold an object of config keys at the top level, got {type(data).__name__}."
        )
    non_string = [key for key in data if not isinstance(key, str)]
    if non_string:
        raise ConfigError(f"config keys must be strings; {origin} has {non_string[0]!r}.")
    return data
