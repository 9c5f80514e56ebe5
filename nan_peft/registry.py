"""Registries of named functions whose keyword options are checked against their signatures."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from .errors import NanPeftError


def checked_options(kind: str, registry: Mapping[str, Callable], name: str, skip: int, options: Mapping) -> dict:
    """The options (those not None) that `registry[name]` takes, or NanPeftError naming what is wrong.

    `skip` leading positional parameters are the data, not options. A parameter without a default is
    required; an option the function does not take is a conflict, never silently ignored.
    """
    if name not in registry:
        raise NanPeftError(f"unknown {kind} {name!r}; choose from {', '.join(registry)}")
    parameters = list(inspect.signature(registry[name]).parameters.values())[skip:]
    accepted = {p.name for p in parameters}
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key not in accepted:
            takes = ", ".join(sorted(accepted)) or "none"
            raise NanPeftError(f"{name} {kind}: no option {key} (options: {takes})")
    missing = [p.name for p in parameters if p.default is p.empty and p.name not in given]
    if missing:
        raise NanPeftError(f"{name} {kind}: needs {', '.join(missing)}")
    return given
