"""Every option of a merge in one typed place: its name (the Python keyword and YAML key; the CLI flag is the
name with dashes), type, default, choices and check.

- MergeSpec: how the adapters are merged (coefficients, rule, combination, device, dtype); merge_adapters
  builds one from its keywords, validates it once before any reading, and keeps it in the result.
- OutputSpec: what is written (heads, serving engine and its deployment, file format).
- FoldSpec: folding into a base model instead (base, device map, memory).

The CLI's options and the YAML recipe's keys are generated from these fields (cli.app.spec_options, load_recipe); the record
stores MergeSpec.record_options() verbatim; the fold reads the rule and its options from the result's spec.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .combination import TRUNCATIONS, default_combine
from .coefficients import PROVIDERS
from .devices import resolve_device
from .errors import NanPeftError
from .registry import effective_options
from .rules import CALIBRATIONS, RULES, check_truncation, rule_options
from .scale import parse_scale
from .serving import ENGINES, Target

DTYPES = ("float32", "float16", "bfloat16")
HEADS = ("drop", "per-task", "keep")
FORMATS = ("peft", "gguf")
SIGN_METHODS = ("total", "frequency")
VOCABS = ("base", "union")


def option(default: Any, help: str, section: str, *, choices: Sequence[str] | None = None, metavar: str | None = None,
           kind: type | tuple[type, ...] | None = None, flag: str | None = None, minimum: int | None = None, parse=None) -> Any:
    """A spec field with what the CLI and the recipe need: help and --help section, choices or metavar, the
    Python type(s) a recipe value must have, the flag where it is not --name, a minimum for integers, and the
    function that turns the CLI's text (or a recipe's value) into the field's value."""
    metadata = {"help": help, "section": section, "choices": choices, "metavar": metavar, "kind": kind, "flag": flag, "minimum": minimum,
                "parse": parse}
    return dataclasses.field(default=default, metadata=metadata)


def parse_weights(value) -> tuple[float, ...]:
    """Manual weights from "0.7,0.3" (the CLI) or a list of numbers (a recipe)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise NanPeftError(f"weights must be a comma-separated list of numbers, got {value!r}")
    try:
        return tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise NanPeftError(f"weights must be a comma-separated list of numbers, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """How adapters are merged. None means the default of the provider, rule or combination that applies."""

    coefficients: str | None = option(None, "nan: c_k ~ ||dW_k||^-p [default]; uniform: c_k = total/K; manual: --weights.",
                                      "Coefficients", choices=tuple(PROVIDERS))
    weights: tuple[float, ...] | None = option(None, "Manual coefficients, one per adapter (implies --coefficients manual).",
                                               "Coefficients", metavar="W1,W2,...", kind=(str, list), parse=parse_weights)
    granularity: str | None = option(None, "One coefficient per adapter (norm over all its modules) [default] or one per module.",
                                     "Coefficients", choices=("adapter", "module"))
    exponent: float | None = option(None, "p in c_k ~ ||dW_k||^-p [default 1: the paper's].", "Coefficients", metavar="P", kind=(int, float))
    total: float | None = option(None, "What the coefficients sum to [default 1].", "Coefficients", metavar="T", kind=(int, float))
    method: str = option("task_arithmetic", "The rule the coefficients are plugged into [default task_arithmetic: scale * sum_k c_k dW_k]; "
                         "iso_c, iso_cts, tsv, wudi, knots_* merge in each module's R x R core space (README: Merge rules).",
                         "Merge rule", choices=tuple(RULES))
    density: float | None = option(None, "Fraction of entries kept (ties, dare_*, magnitude_prune, knots_*).", "Merge rule", metavar="D", kind=(int, float))
    scale: float | str | None = option(None, "lambda: multiplies the merged update [default 1]; auto: set from the adapters alone, the merged "
                                       "update's norm GAMMA times their mean norm (nan_peft.scale; the value chosen is recorded).",
                                       "Merge rule", metavar="L|auto", kind=(int, float, str), parse=parse_scale)
    normalize: bool | None = option(None, "ties, dare_ties: average the agreeing entries (default) or sum them.", "Merge rule",
                                    kind=bool, flag="--normalize/--no-normalize")
    seed: int | None = option(None, "Seed of the random drops (dare_*) [default 0].", "Merge rule", kind=int)
    majority_sign_method: str | None = option(None, "ties, dare_ties, knots_*: elect each entry's sign by mass [total, default] or by vote "
                                              "(frequency), as peft's.", "Merge rule", choices=SIGN_METHODS)
    common: float | None = option(None, "iso_cts: fraction of the rank given to the common subspace, in (0, 1) [default 0.8]; the rest "
                                  "is split evenly among the tasks' own directions.", "Merge rule", metavar="F", kind=(int, float))
    calibrate: str | None = option(None, "Singular value calibration after the rule (task_arithmetic, tsv, wudi, knots_*): each merged "
                                   "singular direction scaled down by how much more of it the merge carries than the adapters.",
                                   "Merge rule", choices=CALIBRATIONS)
    combine: str | None = option(None, "cat: exact, rank = sum of ranks [default for task_arithmetic and the spectral rules]; svd: best "
                                 "rank-R approximation.",
                                 "Combination", choices=("cat", "svd"))
    rank: int | None = option(None, "Target rank (svd: required; cat: pad up to R).", "Combination", metavar="R", kind=int, minimum=1)
    truncation: str | None = option(None, "How svd truncates: exact (from the R x R core), randomized (block Krylov range finder, within "
                                    "1e-3 of the optimum) or auto, by cost [default auto; recorded per module].", "Combination",
                                    choices=TRUNCATIONS)
    oversample: int | None = option(None, "Randomized truncation: extra columns per Krylov block [default 16].", "Combination",
                                    metavar="P", kind=int, minimum=0)
    power_iterations: int | None = option(None, "Randomized truncation: Krylov blocks after the first [default 4].", "Combination",
                                          metavar="Q", kind=int, minimum=0)
    sketch_seed: int | None = option(None, "Randomized truncation: seed of the test matrices, drawn per module [default 0].", "Combination",
                                     metavar="S", kind=int, minimum=0)
    device: str = option("cpu", "Where to compute [default cpu].", "Execution", metavar="cpu|cuda|auto", kind=str)
    dtype: str | None = option(None, "dtype of the written factors [default: the inputs'].", "Execution", choices=DTYPES)
    allow_different_bases: bool = option(False, "Merge adapters whose configs name different base models.", "Input and output", kind=bool)
    allow_duplicates: bool = option(False, "Merge the same adapter more than once (it then weighs more).", "Input and output", kind=bool)

    def __post_init__(self):
        coefficients, weights = self.coefficients, self.weights
        if coefficients is not None and not isinstance(coefficients, str):  # the weights themselves
            if weights is not None:
                raise NanPeftError("give the weights either as coefficients= or as weights=, not both")
            coefficients, weights = "manual", coefficients
        if weights is not None:
            weights = tuple(weights)
        set_ = object.__setattr__
        set_(self, "coefficients", coefficients or ("nan" if weights is None else "manual"))
        set_(self, "weights", weights)
        set_(self, "dtype", dtype_name(self.dtype))
        set_(self, "device", str(resolve_device(self.device)))
        if self.scale is not None:
            set_(self, "scale", parse_scale(self.scale))
        check_choices(self, ("granularity", "majority_sign_method", "combine", "calibrate", "truncation"))
        for key in ("density", "scale", "exponent", "total", "common"):
            value = getattr(self, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                raise NanPeftError(f"{key} must be a finite number, got {value}")
        if self.common is not None and not 0 < self.common < 1:
            raise NanPeftError(f"common must be in (0, 1), got {self.common}")
        if self.scale == 0:
            raise NanPeftError("scale 0 makes the merged update zero: nothing to merge")
        check_integers(self, {"rank": 1})
        rule_options(self.method, self.rule_given)  # fail before any reading
        set_(self, "combine", self.combine or default_combine(self.method))
        check_truncation(self.method, self.combine)

    @property
    def rule_given(self) -> dict:
        """The rule options given (not None), seed included."""
        names = ("density", "scale", "normalize", "seed", "majority_sign_method", "common", "calibrate")
        return {key: getattr(self, key) for key in names if getattr(self, key) is not None}

    @property
    def truncation_given(self) -> dict:
        """The randomized truncation's options given (not None), as combine takes them."""
        names = ("truncation", "oversample", "power_iterations", "sketch_seed")
        return {key: getattr(self, key) for key in names if getattr(self, key) is not None}

    @property
    def provider_given(self) -> dict:
        """The coefficient provider's options as coefficients_for takes them."""
        return {"weights": self.weights, "granularity": self.granularity, "exponent": self.exponent, "total": self.total}

    def effective_rule_options(self) -> dict:
        """The merge rule's options as it uses them: given, else its defaults (seed only for random rules; an option
        left at None, calibrate not asked for, is not one in use)."""
        given, seed = rule_options(self.method, self.rule_given)
        effective = {key: value for key, value in effective_options(RULES, self.method, 3, given).items() if value is not None}
        if seed is not None:
            effective["seed"] = seed
        return effective

    def effective_coefficient_options(self) -> dict:
        """exponent and total as the coefficient provider uses them; None where it takes none."""
        effective = effective_options(PROVIDERS, self.coefficients, 1, self.provider_given)
        return {key: None if key not in effective else float(effective[key]) for key in ("exponent", "total")}

    def record_options(self, granularity: str, dtype: torch.dtype) -> dict:
        """The merge's options as the record and MergeResult.options hold them (granularity and dtype as used)."""
        return {
            "method": self.method,
            **{key: value for key, value in self.rule_given.items()},
            "combine": self.combine,
            "rank": self.rank,
            **self.truncation_given,
            "coefficients": self.coefficients,
            "weights": None if self.weights is None else [float(w) for w in self.weights],
            "granularity": granularity,
            "exponent": self.exponent,
            "total": self.total,
            "dtype": str(dtype).removeprefix("torch."),
        }


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """What is written for a merged adapter."""

    heads: str = option("drop", "Full modules the adapters carry (modules_to_save, e.g. task heads): drop them [default], write "
                        "OUTPUT/<task>/ with each task's own head beside the merge (per-task), or keep them when all adapters share them.",
                        "Input and output", choices=HEADS)
    serve: str | None = option(None, "Fit the output to a serving engine (rank padded to one it takes, tensors it refuses left out), say "
                               "what changed, and refuse if it still could not serve it.", "Input and output", choices=ENGINES)
    tensor_parallel: int | None = option(None, "The engine's tensor-parallel degree, with --serve (LoRAX and TGI pad ranks by it) [default 1].",
                                         "Input and output", metavar="N", kind=int, minimum=1)
    engine_version: str | None = option(None, "The engine version to fit, with --serve (vLLM 0.32 and later honour rank/alpha patterns) "
                                        "[default: installed, else the oldest rules].", "Input and output", metavar="V", kind=str)
    format: str = option("peft", "peft: adapter_config.json + adapter_model.safetensors [default]; gguf: adapter_model.gguf for llama.cpp "
                         "and Ollama (implies --serve llamacpp; needs --base; pip install 'nan-peft[gguf]').", "Input and output", choices=FORMATS)
    base: str | None = option(None, "The base model's folder: the one full fine-tuned inputs were tuned from (their task vectors are "
                              "W_k - BASE), or its config.json for --format gguf [default: base_model_name_or_path, when a local "
                              "folder].", "Input and output", metavar="BASE", kind=str)
    vocab: str | None = option(None, "Full checkpoints whose vocabulary differs from the base's: keep the base's rows (base) or every "
                               "input's (union) [default: refuse].", "Input and output", choices=VOCABS)

    def __post_init__(self):
        check_choices(self, ("heads", "serve", "format", "vocab"))
        if self.tensor_parallel is not None:
            Target("peft", self.tensor_parallel)  # the one check of a tensor-parallel degree


@dataclasses.dataclass(frozen=True)
class FoldSpec:
    """Folding the merged update into a base model instead of writing an adapter."""

    fold_into: str | None = option(None, "Write a full model instead of an adapter: BASE (a transformers safetensors folder) + the exact "
                                   "merged update (never truncated by --rank), streamed shard by shard.", "Folding", metavar="BASE", kind=str)
    device_map: str | dict | None = option(None, "Fold with the model loaded and spread by accelerate instead of streaming (updates added "
                                           "where each weight lives).", "Folding", metavar="auto|balanced|sequential|cpu", kind=(str, dict))
    max_memory: str | None = option(None, "Memory per device for --device-map.", "Folding", metavar="0=20GiB,cpu=64GiB", kind=str)


def _like(spec: type, name: str, section: str, default: Any = None, help: str | None = None) -> Any:
    """A field with the help (unless given), choices and checks of `spec`'s field `name` (one word per concept), in `section`."""
    metadata = spec.__dataclass_fields__[name].metadata
    return dataclasses.field(default=default, metadata={**metadata, "section": section, "help": help or metadata["help"]})


@dataclasses.dataclass(frozen=True)
class ExtractSpec:
    """How a LoRA adapter is extracted from a full fine-tune (nan_peft.extract): at each module the best rank-k
    approximation of its task vector tau = W_ft - W_base, k from rank and/or energy."""

    rank: int | None = option(None, "Rank of each module's factors: the best rank-R approximation of its task vector (Eckart-Young).",
                              "Extraction", metavar="R", kind=int, minimum=1)
    energy: float | None = option(None, "Per module, the smallest rank keeping this fraction of ||tau||_F^2, in (0, 1] (with --rank: "
                                  "at most R).", "Extraction", metavar="F", kind=(int, float))
    modules: tuple[str, ...] = option((), "Regex searched in each module path, repeatable: extract the modules some regex matches; a "
                                      "leading ! excludes the modules it matches [default: every Linear, Conv1D and Embedding weight].",
                                      "Extraction", metavar="REGEX", kind=list)
    truncation: str | None = _like(MergeSpec, "truncation", "Extraction", help="How each task vector is factored: exact (a dense SVD), "
                                   "randomized (block Krylov range finder, seeded) or auto, by cost [default auto; recorded per module].")
    oversample: int | None = _like(MergeSpec, "oversample", "Extraction")
    power_iterations: int | None = _like(MergeSpec, "power_iterations", "Extraction")
    sketch_seed: int | None = _like(MergeSpec, "sketch_seed", "Extraction")
    device: str = _like(MergeSpec, "device", "Execution", default="cpu")
    dtype: str | None = option(None, "dtype of the written factors [default: the fine-tune's; float32 if it mixes dtypes].", "Execution",
                               choices=DTYPES)

    def __post_init__(self):
        import re

        set_ = object.__setattr__
        check_integers(self, {"rank": 1, "oversample": 0, "power_iterations": 0, "sketch_seed": 0})
        if self.energy is not None and (isinstance(self.energy, bool) or not isinstance(self.energy, (int, float))
                                        or not 0 < self.energy <= 1):
            raise NanPeftError(f"energy must be a fraction in (0, 1], got {self.energy!r}")
        if self.rank is None and self.energy is None:
            raise NanPeftError("give the rank of the extracted factors (--rank R) or the fraction of each task vector to keep (--energy F)")
        modules = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules or ())
        for pattern in modules:
            try:
                re.compile(pattern.removeprefix("!"))
            except (re.error, AttributeError) as error:
                raise NanPeftError(f"modules: {pattern!r} is not a regular expression ({error})") from None
        set_(self, "modules", modules)
        check_choices(self, ("truncation",))
        set_(self, "device", str(resolve_device(self.device)))
        set_(self, "dtype", dtype_name(self.dtype))


def check_integers(spec, minimums: Mapping[str, int]) -> None:
    """NanPeftError for a field of `minimums` that is given but not an integer at least its minimum (0 or 1)."""
    for key, low in minimums.items():
        value = getattr(spec, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise NanPeftError(f"{key} must be a {'positive' if low == 1 else 'non-negative'} integer, got {value!r}")


def check_choices(spec, names: Sequence[str]) -> None:
    """NanPeftError for a field of `names` whose value is not one of its choices."""
    for name in names:
        value, choices = getattr(spec, name), type(spec).__dataclass_fields__[name].metadata["choices"]
        if value is not None and value not in choices:
            raise NanPeftError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """A float dtype's name from a torch.dtype or a name ("bfloat16", "torch.float16"); None stays None."""
    if dtype is None:
        return None
    resolved = getattr(torch, dtype.removeprefix("torch."), dtype) if isinstance(dtype, str) else dtype
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        raise NanPeftError(f"dtype must be a float type such as float32, float16 or bfloat16, not {dtype!r}")
    return str(resolved).removeprefix("torch.")
