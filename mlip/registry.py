"""Registries that pick backbones, heads and long-range terms by the name given in the config.

A config variant carries ``name: Literal["mace"]``; the registry maps that name to
the class that builds it, so adding a model never adds an ``if name == ...`` chain.
"""

from __future__ import annotations

from typing import Callable, Dict

from mlip.errors import ConfigError

BACKBONES: Dict[str, type] = {}
HEADS: Dict[str, type] = {}
LONG_RANGE: Dict[str, type] = {}


def _register(table: Dict[str, type], kind: str, name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in table:
            raise ValueError(f"{kind} '{name}' is registered twice ({table[name]} and {cls})")
        table[name] = cls
        return cls
    return decorator


def register_backbone(name: str):
    return _register(BACKBONES, "backbone", name)


def register_head(name: str):
    return _register(HEADS, "head", name)


def register_long_range(name: str):
    return _register(LONG_RANGE, "long-range term", name)


def lookup(table: Dict[str, type], name: str, key_path: str) -> type:
    """The class registered under ``name``, or a ConfigError naming the key and the choices."""
    if name not in table:
        raise ConfigError(f"{key_path}: unknown name '{name}'; known: {sorted(table)}")
    return table[name]
