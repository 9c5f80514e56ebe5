"""Experiment 1: the paper's least-squares setting (Section 3), exactly.

K tasks fit the same linear map from different amounts of data. Task k sees n_k samples x ~ N(0, I_d),
y = x W*_k + sigma * noise, and fits W_k by least squares; its update is dW_k = W_k - W_0 (W_0: the
"pretrained" weights). The merge W_0 + sum_k c_k dW_k is compared with the exact optimum of the summed loss
sum_k ||X_k W - Y_k||^2, the pooled fit (sum X_k^T X_k)^-1 sum X_k^T X_k W_k.

The zero-mean assumption of NAN: dW_k = (W*_k - W_0) + E_k, where E_k is estimation noise with
E ||E_k||_F^2 = sigma^2 m d / (n_k - d - 1). When the true shift W*_k - W_0 is small next to E_k, the norm
measures the noise, so ||dW_k||^-2 ~ n_k (the data-volume weight) and ||dW_k||^-1 ~ sqrt(n_k). A common
non-zero shift (`shift`) pulls NAN towards uniform; task-specific shifts of different sizes (`spread`) make it
weigh tasks by how far they moved, not by how much data they had.

Every update is a LoRA module (B = dW_k, A = I, scale 1) in a nan_peft.LoraAdapter; NAN coefficients and the
merged updates come from nan_peft.merge_adapters, the code under test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import nan_peft

EXPONENTS = (1.0, 2.0)  # merged through merge_adapters
EXPONENT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # coefficients from nan_coefficients on the same Gram


@dataclass(frozen=True)
class Case:
    volumes: tuple = (64, 256, 1024)  # n_k
    d: int = 32  # input dimension
    m: int = 8  # output dimension
    sigma: float = 1.0  # label noise
    shift: float = 0.0  # norm of a shift shared by all tasks, in units of the mean noise norm of the updates
    spread: float = 0.0  # norm of task-specific shifts, same unit; task k's is scaled by spread_profile[k]
    spread_profile: tuple = (0.5, 1.0, 2.0)


def noise_norm(case: Case) -> float:
    """sqrt of the mean over tasks of E||E_k||_F^2 = sigma^2 m d / (n_k - d - 1)."""
    return math.sqrt(np.mean([case.sigma ** 2 * case.m * case.d / (n - case.d - 1) for n in case.volumes]))


def as_adapter(name: str, update: np.ndarray) -> nan_peft.LoraAdapter:
    """A full-rank update as a LoRA module: dW = B @ A with B = dW, A = I."""
    module = nan_peft.LoraModule(A=torch.eye(update.shape[1], dtype=torch.float64),
                                 B=torch.from_numpy(update), scale=1.0)
    return nan_peft.LoraAdapter(name=name, source=name, config={"base_model_name_or_path": "linear"},
                                modules={"linear": module})


def trial(case: Case, rng: np.random.Generator) -> dict:
    """One draw: fit every task, merge every way, return coefficients and losses."""
    K, d, m = len(case.volumes), case.d, case.m
    unit = noise_norm(case)
    W0 = rng.standard_normal((d, m))

    def direction():
        g = rng.standard_normal((d, m))
        return g / np.linalg.norm(g)

    common = case.shift * unit * direction()
    targets = [W0 + common + case.spread * unit * p * direction() for p in case.spread_profile[:K]]
    X = [rng.standard_normal((n, d)) for n in case.volumes]
    Y = [x @ w + case.sigma * rng.standard_normal((len(x), m)) for x, w in zip(X, targets)]
    fits = [np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(X, Y)]
    updates = [w - W0 for w in fits]

    grams = [x.T @ x for x in X]
    pooled = np.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, fits)))
    total = sum(case.volumes)

    def train_loss(W):  # the paper's objective, per sample
        return sum(float(np.sum((x @ W - y) ** 2)) for x, y in zip(X, Y)) / total

    def risk(W):  # expected loss on fresh data drawn like the training data, minus the noise floor
        return sum(n * float(np.sum((W - w) ** 2)) for n, w in zip(case.volumes, targets)) / total

    adapters = [as_adapter(f"task{k}", u.T.copy()) for k, u in enumerate(updates)]  # LoRA: (out, in)

    def merged(**options):
        result = nan_peft.merge_adapters(adapters, **options)
        update = result.adapter.modules["linear"].delta().numpy().T
        return W0 + update, np.asarray(result.coefficients.per_adapter, dtype=float)

    volume = np.asarray(case.volumes, dtype=float) / total
    rows = {"uniform": merged(coefficients="uniform"), "data volume": merged(coefficients=volume.tolist())}
    for p in EXPONENTS:
        rows[f"NAN p={p:g}"] = merged(coefficients="nan", exponent=p)
    rows["best coefficients"] = best_coefficients(W0, updates, X, Y)
    rows["pooled fit (optimum)"] = (pooled, None)
    optimum = train_loss(pooled)
    out = {"norms": [float(np.linalg.norm(u)) for u in updates], "optimum_loss": optimum}
    gram = nan_peft.update_gram(adapters)
    for p in EXPONENT_GRID:
        c = nan_peft.nan_coefficients(gram, exponent=p).per_adapter.numpy()
        out[f"exponent {p:g}"] = {"coefficients": c.tolist(),
                                  "excess_loss": train_loss(W0 + sum(ci * u for ci, u in zip(c, updates))) - optimum}
    for name, (W, c) in rows.items():
        out[name] = {"coefficients": None if c is None else c.tolist(), "excess_loss": train_loss(W) - optimum,
                     "excess_risk": risk(W)}
    return out


def best_coefficients(W0, updates, X, Y) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients (summing to 1) that minimise the summed training loss: a K-variable least squares."""
    K = len(updates)
    # loss(c) = sum_k ||X_k (W0 + sum_j c_j U_j) - Y_k||^2 = ||F c - r||^2 with F's columns vec(X U_j)
    F = np.stack([np.concatenate([(x @ u).ravel() for x in X]) for u in updates], axis=1)
    r = np.concatenate([(y - x @ W0).ravel() for x, y in zip(X, Y)])
    G, b = F.T @ F, F.T @ r
    kkt = np.block([[2 * G, np.ones((K, 1))], [np.ones((1, K)), np.zeros((1, 1))]])
    c = np.linalg.solve(kkt, np.concatenate([2 * b, [1.0]]))[:K]
    return W0 + sum(ci * u for ci, u in zip(c, updates)), c


MERGES = ("uniform", "data volume", "NAN p=1", "NAN p=2", "best coefficients")


def summarise(case: Case, trials: list[dict]) -> dict:
    volume = np.asarray(case.volumes, dtype=float) / sum(case.volumes)
    summary = {"case": asdict(case), "trials": len(trials),
               "norms": np.mean([t["norms"] for t in trials], axis=0).tolist()}
    uniform_gap = np.array([t["uniform"]["excess_loss"] for t in trials])
    for name in MERGES:
        c = np.array([t[name]["coefficients"] for t in trials])
        gap = np.array([t[name]["excess_loss"] for t in trials])
        ratio = gap / np.maximum(uniform_gap, 1e-300)
        risk = np.array([t[name]["excess_risk"] for t in trials]) / np.array([t["pooled fit (optimum)"]["excess_risk"] for t in trials])
        summary[name] = {
            "coefficients": c.mean(0).tolist(),
            "coefficient_distance": float(np.abs(c - volume).sum(1).mean()),  # L1 to n_k / sum n
            "excess_loss": float(gap.mean()),
            "gap_vs_uniform": float(np.median(ratio)),  # 0 = optimum, 1 = no better than uniform
            "gap_vs_uniform_q": np.quantile(ratio, [0.25, 0.75]).tolist(),
            "risk_vs_optimum": float(np.median(risk)),  # excess test risk / that of the pooled fit
        }
    summary["exponents"] = {}
    for p in EXPONENT_GRID:
        c = np.array([t[f"exponent {p:g}"]["coefficients"] for t in trials])
        gap = np.array([t[f"exponent {p:g}"]["excess_loss"] for t in trials])
        summary["exponents"][f"{p:g}"] = {"coefficient_distance": float(np.abs(c - volume).sum(1).mean()),
                                          "gap_vs_uniform": float(np.median(gap / np.maximum(uniform_gap, 1e-300)))}
    return summary


def run_case(case: Case, trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return summarise(case, [trial(case, rng) for _ in range(trials)])


def sweeps(quick: bool = False) -> dict[str, tuple[str, list[Case]]]:
    """The sweeps: (x-axis label, cases). Each varies one thing from the base case."""
    base = Case()
    ratios = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32, 64)
    small = 64

    def volumes(r):  # three tasks, geometric volumes from `small` to r * small
        return (small, int(round(small * math.sqrt(r))), small * r)

    out = {
        "volume ratio": ("largest / smallest n_k", [replace(base, volumes=volumes(r)) for r in ratios]),
        "shared shift": ("shared shift / noise norm", [replace(base, shift=s) for s in ((0, 1, 4) if quick else (0, 0.25, 0.5, 1, 2, 4, 8))]),
        "noise": ("sigma (shared shift fixed at 1 x the noise norm for sigma = 1)",
                  [replace(base, sigma=s, shift=1.0 / s) for s in ((0.5, 2) if quick else (0.25, 0.5, 1, 2, 4))]),
        "dimension": ("input dimension d (n_k = 64, 256, 1024)", [replace(base, d=d) for d in ((8, 32) if quick else (4, 8, 16, 32, 48))]),
        "task-specific shifts": ("task-specific shift / noise norm (largest shift on the largest task)",
                                 [replace(base, spread=s) for s in ((0, 1) if quick else (0, 0.25, 0.5, 1, 2, 4))]),
        "task-specific shifts, reversed": ("task-specific shift / noise norm (largest shift on the smallest task)",
                                           [replace(base, spread=s, spread_profile=(2.0, 1.0, 0.5)) for s in ((0, 1) if quick else (0, 0.25, 0.5, 1, 2, 4))]),
    }
    return out


def run(quick: bool = False, trials: int | None = None, log=print) -> dict:
    trials = trials or (4 if quick else 30)
    results = {"trials": trials, "sweeps": {}}
    for name, (axis, cases) in sweeps(quick).items():
        results["sweeps"][name] = {"axis": axis, "cases": [run_case(c, trials, seed=i) for i, c in enumerate(cases)]}
        log(f"theory: {name}: {len(cases)} cases x {trials} trials")
    return results
