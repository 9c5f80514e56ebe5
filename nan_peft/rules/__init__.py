"""Merge rules: how the coefficient-weighted updates of one module become one update.

A rule is a function (deltas (K, m, n), weights (K,), generator, **options) -> (m, n) on dense float
updates; its keyword options are checked against its signature (registry.checked_options). Rules listed in
LOW_RANK are plain weighted sums and run exactly on the LoRA factors instead (combine cat / svd). Rules listed
in SPECTRAL (spectral.py) are equivariant under orthogonal changes of basis and run on each module's R x R cores
instead (core_space.py; RIGHT_DENSE ones on the left-reduced R x n updates), exactly, never densely; so does
task_arithmetic with calibrate. Any coefficient provider works with any rule: the coefficients are the `weights`.

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
from .iso_c import iso_c
from .iso_cts import iso_cts
from .knots import knots_dare, knots_ties
from .magnitude_prune import magnitude_prune
from .svc import CALIBRATIONS
from .task_arithmetic import task_arithmetic
from .ties import ties
from .tsv import tsv
from .wudi import wudi

Rule = Callable[..., torch.Tensor]

RULES: dict[str, Rule] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "tsv": tsv,
    "wudi": wudi,
    "knots_ties": knots_ties,
    "knots_dare": knots_dare,
}
LOW_RANK = {"task_arithmetic"}
SPECTRAL = {"iso_c", "iso_cts", "tsv", "wudi", "knots_ties", "knots_dare"}
RIGHT_DENSE = {"knots_ties", "knots_dare"}
RANDOM = {"dare_linear", "dare_ties", "knots_dare"}
FLAT = {"iso_c", "iso_cts"}
"""Rules whose merged spectrum is flat: every rank-r truncation is equally near, so none is chosen (combine cat only)."""
CALIBRATED = {"task_arithmetic", "tsv", "wudi", "knots_ties", "knots_dare"}
"""The rules calibrate="svc" may follow. Not iso_c and iso_cts: their merged spectrum is flat, so its singular
directions are not defined; not the entry-wise rules: their merged update is dense, outside the core space."""


def check_truncation(name: str, combine: str | None) -> None:
    """NanPeftError where rule `name` cannot be truncated (combine svd): its merged spectrum is flat."""
    if combine == "svd" and name in FLAT:
        raise NanPeftError(f"{name} gives a flat spectrum (every singular value equal): a truncation would keep an arbitrary subspace of it; "
                           "merge it exactly (combine cat, rank = the sum of the ranks)")


def in_core_space(name: str, options: Mapping) -> bool:
    """Whether rule `name` with `options` runs in the core space (combine's spectral path)."""
    return name in SPECTRAL or options.get("calibrate") is not None


def rule_options(name: str, options: Mapping) -> tuple[dict, int | None]:
    """Validated options for rule `name` (those not None) and the seed of a random rule (default 0)."""
    options = dict(options)
    seed = options.pop("seed", None)
    calibrate = options.get("calibrate")
    if calibrate is not None and name in RULES and name not in CALIBRATED:
        if calibrate not in CALIBRATIONS:
            raise NanPeftError(f"unknown calibrate {calibrate!r}; choose from {', '.join(CALIBRATIONS)}")
        why = "its merged spectrum is flat: no singular direction to calibrate" if name in SPECTRAL else "it acts entry-wise on the dense update"
        raise NanPeftError(f"--calibrate {calibrate} does not follow {name} ({why}); it follows {', '.join(sorted(CALIBRATED))}")
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
