"""Registries of named functions whose keyword options are read once from their signatures (as mergekit
registers its merge methods): the function declares its options and their defaults, and nothing else does."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping

from .errors import NanPeftError

REQUIRED = inspect.Parameter.empty
"""The default of an option that has none: it must be given."""


@functools.lru_cache(maxsize=None)
def option_defaults(function: Callable, skip: int) -> dict[str, object]:
    """{option: its default, or REQUIRED} of `function`, after its `skip` leading data parameters."""
    return {p.name: p.default for p in list(inspect.signature(function).parameters.values())[skip:]}


def checked_options(kind: str, registry: Mapping[str, Callable], name: str, skip: int, options: Mapping) -> dict:
    """The options (those not None) that `registry[name]` takes, or NanPeftError naming what is wrong.

    `skip` leading positional parameters are the data, not options. A parameter without a default is
    required; an option the function does not take is a conflict, never silently ignored.
    """
    if name not in registry:
        raise NanPeftError(f"unknown {kind} {name!r}; choose from {', '.join(registry)}")
    defaults = option_defaults(registry[name], skip)
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key not in defaults:
            takes = ", ".join(sorted(defaults)) or "none"
            raise NanPeftError(f"{name} {kind}: no option {key} (options: {takes})")
    missing = [key for key, default in defaults.items() if default is REQUIRED and key not in given]
    if missing:
        raise NanPeftError(f"{name} {kind}: needs {', '.join(missing)}")
    return given


def effective_options(registry: Mapping[str, Callable], name: str, skip: int, options: Mapping) -> dict:
    """Every option of `registry[name]` as a call with `options` uses it: given, else its default."""
    return {key: options.get(key) if options.get(key) is not None else default for key, default in option_defaults(registry[name], skip).items()}
