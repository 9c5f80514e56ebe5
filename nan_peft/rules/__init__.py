"""Merge rules: how the coefficient-weighted updates of one module become one update.

A rule is a function (deltas (K, m, n), weights (K,), generator, **options) -> (m, n) on dense float
updates; its keyword options are checked against its signature (registry.checked_options). Rules listed in
LOW_RANK are plain weighted sums and run exactly on the LoRA factors instead (combine cat / svd). Any
coefficient provider works with any rule: the coefficients are the `weights`.

A new rule is one file in this package and one line below.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import torch

from ..errors import NanPeftError
from ..registry import checked_options
from .dare import dare_linear, dare_ties
from .family import SIGN_METHODS
from .magnitude_prune import magnitude_prune
from .task_arithmetic import task_arithmetic
from .ties import ties

Rule = Callable[..., torch.Tensor]

RULES: dict[str, Rule] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
LOW_RANK = {"task_arithmetic"}
RANDOM = {"dare_linear", "dare_ties"}


def rule_options(name: str, options: Mapping) -> tuple[dict, int | None]:
    """Validated options for rule `name` (those not None) and the seed of a random rule (default 0)."""
    options = dict(options)
    seed = options.pop("seed", None)
    given = checked_options("rule", RULES, name, 3, options)
    if given.get("majority_sign_method", "total") not in SIGN_METHODS:
        raise NanPeftError(f"unknown majority_sign_method {given['majority_sign_method']!r}; choose from {', '.join(SIGN_METHODS)}")
    if name in RANDOM:
        return given, 0 if seed is None else int(seed)
    if seed is not None:
        raise NanPeftError(f"{name} rule: no option seed (only {', '.join(sorted(RANDOM))} are random)")
    return given, None


def module_generator(seed: int, module: str) -> torch.Generator:
    """A CPU generator for one module, seeded from (seed, module path) alone: results do not depend on the
    order or batching of modules, nor on the device (masks are drawn on the CPU, see family.drop_random)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
