"""Load an ml_collections config file and apply `--config.a.b=value` overrides.

Config files are Python files in `configs/` exposing `get_config(arg: str | None)`; a file may be
named as `configs/llada_8b.py:v5e_64` to pass `arg` (a named variant), like ml_collections'
`config_flags`.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections


class ConfigError(ValueError):
    """A config file or override the user must fix."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py` or `path/to/file.py:variant` -> ConfigDict."""
    path_str, _, variant = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass e.g. --config configs/tiny.py)")
    module_spec = importlib.util.spec_from_file_location(f"_llada_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config(variant or None) if variant else module.get_config()


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as a path


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=v` (or `--config.a.b v`) overrides; types must match the field's."""
    pending = list(overrides)
    while pending:
        item = pending.pop(0)
        if not item.startswith("--config."):
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --config.optim.lr=1e-5")
        key, sep, raw = item[len("--config."):].partition("=")
        if not sep:
            if not pending:
                raise ConfigError(f"override --config.{key} has no value")
            raw = pending.pop(0)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ConfigError(f"unknown config field {key!r} (no section {name!r})")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"unknown config field {key!r}; known: {sorted(node.keys())}")
        value = _parse_value(raw)
        current = node[leaf]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and isinstance(value, str) and not isinstance(current, str):
            raise ConfigError(f"--config.{key}={raw}: expected a {type(current).__name__}")
        try:
            node[leaf] = value
        except TypeError as err:
            raise ConfigError(f"--config.{key}={raw}: {err}") from None
    return config


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(spec), list(overrides))
