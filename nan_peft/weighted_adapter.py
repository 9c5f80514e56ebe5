"""peft's add_weighted_adapter, computed by nan-peft: the same call, argument for argument, so that

    model.add_weighted_adapter(adapters, weights, "merged", combination_type="ties_svd", density=0.5)

becomes

    nan_peft.add_weighted_adapter(model, adapters, weights, "merged", combination_type="ties_svd", density=0.5)

with weights=None for NAN coefficients, and each combination type computed as the exact weighted update of its
rule (peft/tuners/lora/model.py: add_weighted_adapter and the two helpers it dispatches to)."""

from __future__ import annotations

from collections.abc import Sequence

from peft import PeftModel

from .errors import NanPeftError
from .live import add_nan_weighted_adapter
from .merge import MergeResult
from .rules.family import SIGN_METHODS

# combination_type -> (nan-peft rule, combine). Beside each: what peft computes, from
# peft/tuners/lora/model.py (peft 0.21) and peft/utils/merge_utils.py.
COMBINATION_TYPES: dict[str, tuple[str, str]] = {
    # add_weighted_adapter, "cat": A = [w_k s_k A_k], B = [B_k] stacked: the exact weighted sum (equal here)
    "cat": ("task_arithmetic", "cat"),
    # _generalized_task_arithmetic_weighted_adapter: sum_k sqrt(w_k s_k) B_k times sum_k sqrt(w_k s_k) A_k, whose
    # cross terms B_j A_k are no adapter's update; here the exact weighted sum, as cat
    "linear": ("task_arithmetic", "cat"),
    # _svd_generalized_task_arithmetic_weighted_adapter: merge_utils.task_arithmetic on get_delta_weight, then
    # torch.linalg.svd truncated to svd_rank: the best rank-svd_rank approximation (equal here, without the dense SVD)
    "svd": ("task_arithmetic", "svd"),
    # the *_svd types: merge_utils.ties / dare_linear / dare_ties / magnitude_prune on the dense updates, then
    # truncated by SVD: the rule as written (equal here, up to the differences listed in the docstring)
    "ties_svd": ("ties", "svd"),
    "dare_linear_svd": ("dare_linear", "svd"),
    "dare_ties_svd": ("dare_ties", "svd"),
    "magnitude_prune_svd": ("magnitude_prune", "svd"),
    # the same rules without _svd: _generalized_task_arithmetic_weighted_adapter applies them to the A's and to
    # the B's separately (trimming, dropping and electing signs on factors); here the rule on the updates, as *_svd
    "ties": ("ties", "svd"),
    "dare_linear": ("dare_linear", "svd"),
    "dare_ties": ("dare_ties", "svd"),
    "magnitude_prune": ("magnitude_prune", "svd"),
}
SIGN_RULES = {"ties", "dare_ties"}  # the rules that take majority_sign_method (peft ignores it elsewhere)
DENSITY_RULES = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
SET_BY_PEFT_ARGUMENTS = {"method": "combination_type", "combine": "combination_type", "rank": "svd_rank", "coefficients": "weights"}


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float] | None,
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    **options,
) -> MergeResult:
    """Add adapter `adapter_name` to `model` (a PeftModel) as peft's model.add_weighted_adapter does, with
    peft's arguments in peft's order; weights=None means NAN coefficients (c_k proportional to 1 / ||dW_k||_F,
    summing to 1), a list means those weights, as in peft. Other keywords go to add_nan_weighted_adapter
    (seed for DARE, device, dtype, exponent, total, granularity, scale, normalize). Returns the MergeResult.

    What each combination_type computes, dW_k = s_k B_k A_k being adapter k's update at a module:
    - "cat", "linear": sum_k w_k dW_k exactly (rank = the sum of the ranks). peft's cat is the same; peft's
      linear combines A and B separately, (sum_k sqrt(w_k s_k) B_k)(sum_k sqrt(w_k s_k) A_k), which adds
      cross terms B_j A_k (j != k) that are no adapter's update. For a rank-r result use "svd".
    - "svd": the best rank-`svd_rank` approximation of sum_k w_k dW_k (default rank: the largest of the
      adapters' ranks, as peft's), from QR / r x r Grams of the factors: peft's result without its dense SVD.
    - "ties", "dare_linear", "dare_ties", "magnitude_prune" and their "_svd" forms: the rule applied entry-wise
      to the dense updates dW_k, one module at a time, truncated to `svd_rank` (default as for svd) by SVD.
      That is what peft's _svd forms compute; peft's forms without _svd apply the rule to the A's and the B's
      separately (trimming and sign election on factors, whose product is not the rule's merge), so here both
      forms give the same result.
    - One adapter: its weighted update w dW exactly, whatever the type (peft switches to linear, which is exact
      for one adapter).

    Where the result differs from peft's, and why:
    - TIES averaging (ties*, dare_ties*): here the agreeing entries' |w_k|-weighted mean,
      sum_k w_k dW'_k / sum_k |w_k| over the agreeing k (nan_peft.rules.family); peft's disjoint_merge divides
      sum_k w_k dW'_k by the number of agreeing adapters. The two agree when every weight is 1 (the TIES paper's
      disjoint mean); with other weights peft's result scales with them (weights 0.5 halve it) while this one is
      a weighted mean, whose overall size the `scale` option (lambda) sets. A convention that divides weights
      summing to 1, as NAN's do, by the count would shrink the merge by about the number of adapters.
    - TIES sign election: here on the weighted updates w_k dW'_k, peft's on the unweighted ones: the same for
      positive equal weights; with unequal weights an adapter votes with the mass it contributes, and with a
      negative weight it votes for the sign it contributes. "frequency" gives a tied vote to the mass ("total"),
      peft gives it to +1.
    - DARE: the dropped entries are drawn from a generator seeded per module (seed=, default 0): reproducible,
      the same on any device; peft draws them from torch's global generator.
    - rsLoRA: peft gives the new adapter use_rslora from adapters[0] with lora_alpha = r, so its scaling is
      sqrt(r) instead of 1 and its update sqrt(r) times the merge; here the new adapter has scale 1.
    - Different ranks: peft refuses linear, ties, dare_* and magnitude_prune for adapters of different ranks (r
      or rank_pattern), and fails on per-module ranks that differ; here every type merges any ranks.
    - An existing adapter_name: peft returns without doing anything, here NanPeftError.
    - Full modules the adapters save (modules_to_save, e.g. a task head): peft refuses two adapters that save
      the same module; here they are not merged into the new adapter, and a warning says so.
    - Arguments of peft's dense SVD: svd_full_matrices and svd_driver choose how torch computes it and are not
      needed (nan-peft's truncation needs no dense SVD); svd_clamp clamps the factors' entries at a quantile,
      which changes the update, so it is refused unless None. Like peft, svd_rank is not used by cat and linear,
      density by cat, linear and svd, and majority_sign_method outside ties and dare_ties.
    """
    if not isinstance(model, PeftModel):
        raise NanPeftError(
            f"add_weighted_adapter takes the PeftModel (got a {type(model).__name__}): pass the model that peft's "
            "get_peft_model or PeftModel.from_pretrained returned"
        )
    if combination_type not in COMBINATION_TYPES:
        raise NanPeftError(f"unknown combination_type {combination_type!r}; choose from {', '.join(COMBINATION_TYPES)}")
    if svd_clamp is not None:
        raise NanPeftError(
            "svd_clamp clamps the merged factors' entries, which changes the merged update; nan-peft keeps the exact "
            "truncation: leave svd_clamp None"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise NanPeftError(f"unknown majority_sign_method {majority_sign_method!r}; choose from {', '.join(SIGN_METHODS)}")
    for key, argument in SET_BY_PEFT_ARGUMENTS.items():
        if key in options:
            raise NanPeftError(f"{key} is set by peft's argument {argument} here; drop {key}=")
    adapters = list(adapters)
    # peft/tuners/lora/model.py _check_add_weighted_adapter: "if there is only one adapter, we can only use linear
    # merging"
    rule, combine = COMBINATION_TYPES[combination_type] if len(adapters) > 1 else ("task_arithmetic", "cat")
    rank = None
    if combine == "svd":
        # peft/tuners/lora/model.py _check_add_weighted_adapter: new_rank = svd_rank or max(adapters_ranks)
        ranks = [_largest_rank(model.peft_config[name]) for name in adapters if name in model.peft_config]
        rank = svd_rank or max(ranks, default=None)
    if rule in DENSITY_RULES:
        options["density"] = density
    if rule in SIGN_RULES:
        options["majority_sign_method"] = majority_sign_method
    coefficients = None if weights is None else [float(w) for w in weights]
    return add_nan_weighted_adapter(model, adapters, adapter_name, combine, rank, coefficients, method=rule, **options)


def _largest_rank(config) -> int:
    """The largest rank of an adapter's modules as peft counts it (peft/tuners/lora/model.py
    _check_add_weighted_adapter: config.r, or the largest of it and the rank_pattern's values)."""
    return config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())
