"""Synthetic MLMC levels fitted to a run: Gaussian samples whose per-pixel level means and variances are the
run's, continued past its finest level the way the driver extrapolates (what ``complexity`` runs the driver
on to predict the cost at other eps).

The level means have the noise floor removed (``estimates.squared_bias``); up to the level of the largest
coupled mean the remaining bias of each level is the run's own estimate (``estimates.bias_of_level``), and from
there on the level means follow |E[Y_l]| = c M^(-alpha l) fitted to all asymptotic levels at once, adding up
with the run's coherence; V_l is the run's, extrapolated with the fitted beta, V[P_l] pooled from every path
of its law (as ``estimates.pooled_plain_variance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.estimates import LevelMoments, bias_of_level, remaining_bias_weights, squared_bias
from lightning_mlmc.mlmc.protocol import LevelFunction, level_cost
from lightning_mlmc.mlmc.plan import Rates, fit_rates
from lightning_mlmc.mlmc.sums import LevelSums

Tensor = torch.Tensor
MAX_DRAW = 2048  # samples a synthetic level draws per call; a larger call gets sums of the same law


@dataclass(frozen=True)
class LevelLaw:
    """Per-pixel Gaussian law of one level (float64 tensors of shape (pixels,)): Y_l = P_l - P_(l-1)."""

    mean: Tensor  # E[Y_l]
    var: Tensor  # V[Y_l]
    fine_mean: Tensor  # E[P_l]
    fine_var: Tensor  # V[P_l]


class SyntheticLevels(LevelFunction):
    """A level function of Gaussian samples with given per-pixel laws (the levels of ``laws``).

    At Lmin a sample is P_l ~ N(E[P_l], V[P_l]); above it the coarse sample is P_(l-1) ~ N(E[P_(l-1)],
    V[P_(l-1)]) and the fine one P_(l-1) + Y_l with Y_l ~ N(E[Y_l], V[Y_l]), correlated with P_(l-1) so that
    P_l has the variance V[P_l]. Each (seed, level, batch, rank) has its own stream, as for the diffusion
    levels. Costs per sample: ``costs[l]`` for a coupled level, ``plain_costs[l]`` for a plain one (default:
    the diffusion levels', M^l + M^(l-1) and M^l).
    """

    def __init__(self, laws: dict[int, LevelLaw], M: int, lmin: int, seed: int = 0, costs: dict | None = None,
                 plain_costs: dict | None = None):
        self.laws, self.M, self.lmin, self.seed = laws, M, lmin, seed
        self.costs = costs or {l: level_cost(M, l, -1) for l in range(max(laws) + 2)}
        self.plain_costs = plain_costs or {l: float(M**l) for l in range(max(laws) + 2)}
        self.pixels = int(next(iter(laws.values())).mean.numel())

    can_change_lmin = True

    def with_lmin(self, lmin: int) -> "SyntheticLevels":
        return SyntheticLevels(self.laws, self.M, lmin, self.seed, self.costs, self.plain_costs)

    def cost(self, level: int) -> float:
        return self.plain_costs[level] if level == self.lmin else self.costs[level]

    def plain_cost(self, level: int) -> float:
        return self.plain_costs[level]

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        if level not in self.laws:
            raise InputError(f"level: the synthetic levels stop at {max(self.laws)}, got {level}")
        g = torch.Generator().manual_seed(hash((self.seed, level, batch_index, rank, level == self.lmin)) % 2**63)
        z = lambda rows: torch.randn(rows, self.pixels, generator=g, dtype=torch.float64)  # noqa: E731
        m, law = min(n, MAX_DRAW), self.laws[level]
        if level == self.lmin:  # plain: Y = P_l
            var_c, mean_c, slope, resid = None, None, 0.0, law.fine_var.sqrt()
            dc, mean_y = None, law.fine_mean
        else:  # Y_l correlated with P_(l-1) so that P_l = P_(l-1) + Y_l has the variance V[P_l] (as V_l allows)
            var_c, mean_c, mean_y = self.laws[level - 1].fine_var, self.laws[level - 1].fine_mean, law.mean
            slope = (law.fine_var - var_c - law.var) / 2 / var_c.clamp_min(1e-300)
            slope = torch.minimum(slope.abs(), (law.var / var_c.clamp_min(1e-300)).sqrt()) * slope.sign()
            resid = (law.var - slope**2 * var_c).clamp_min(0.0).sqrt()
            dc = var_c.sqrt() * z(m)
        dy = resid * z(m) + (0.0 if dc is None else slope * dc)
        calls = int(n * self.cost(level))
        if m == n:
            pc = None if dc is None else mean_c + dc
            return LevelSums.from_payoffs(mean_y + dy + (0.0 if pc is None else pc), pc, calls)
        # More samples than are drawn: the means of n samples from their exact law, the central sums scaled
        # from the m drawn (their relative noise is then that of m samples, sqrt(2 / m) for the variances).
        ec = torch.zeros(self.pixels, dtype=torch.float64) if dc is None else (var_c / n).sqrt() * z(1)[0]
        ybar, cbar = mean_y + slope * ec + resid / math.sqrt(n) * z(1)[0], (0.0 if dc is None else mean_c + ec)
        dy = dy - dy.mean(0)
        k2, k34 = (n - 1) / (m - 1), n / m
        syy, sy3, sy4 = k2 * dy.pow(2).sum(0), k34 * dy.pow(3).sum(0), k34 * dy.pow(4).sum(0)
        sums = {"y1": n * ybar, "y2": syy + n * ybar**2, "y3": sy3 + 3 * ybar * syy + n * ybar**3,
                "y4": sy4 + 4 * ybar * sy3 + 6 * ybar**2 * syy + n * ybar**4,
                "nz": torch.full_like(ybar, float(n))}  # Gaussian differences: none is exactly zero
        if dc is None:
            sums.update(f1=sums["y1"], f2=sums["y2"], c1=torch.zeros_like(ybar), c2=torch.zeros_like(ybar))
        else:
            dc = dc - dc.mean(0)
            scc, scy = k2 * dc.pow(2).sum(0), k2 * (dc * dy).sum(0)
            sums.update(c1=n * cbar, c2=scc + n * cbar**2)
            sums.update(f1=sums["c1"] + sums["y1"], f2=sums["c2"] + 2 * (scy + n * cbar * ybar) + sums["y2"])
        sums.update(s0=torch.full_like(ybar, float(n)), s1=sums["f1"], s2=sums["f2"])  # single paths: no pairs
        return LevelSums(n, sums, calls)


def _plain_var(by: dict[int, LevelMoments], level: int, lmin: int) -> Tensor:
    """Per-pixel V[P_level] pooled over every path of its law: the fine paths of the level and the coarse
    paths of the next (as ``estimates.pooled_plain_variance``, before the average over pixels)."""
    parts = [(by[level].fine_sum, by[level].fine_sq, by[level].n)]
    if level + 1 in by:
        parts.append((by[level + 1].coarse_sum, by[level + 1].coarse_sq, by[level + 1].n))
    s1, s2, n = (sum(p[i] for p in parts) for i in range(3))
    return (s2 / n - (s1 / n) ** 2).clamp_min(0.0) * (n / max(n - 1, 1))


def weak_error_fit(moments: list[LevelMoments], lmin: int, M: int, alpha_default: float) -> tuple[int, float, float]:
    """(peak level, c, alpha) of |E[Y_l]| = c M^(-alpha l) fitted to the coupled levels from the largest
    debiased mean on (the driver's asymptotic range), by weighted least squares on the debiased squared means
    (``squared_bias``: noise floor removed, weights from their standard errors; zeros kept, so no log),
    alpha in [0.5, 1] as the driver's fit (``alpha_default`` with fewer than two levels)."""
    coupled = [m for m in moments if m.level > lmin and m.n > 1]
    est = [squared_bias(m.mean, m.var / m.n) for m in coupled]
    peak = max(range(len(est)), key=lambda i: est[i].value)
    lv = np.array([m.level for m in coupled[peak:]], dtype=float)
    d2 = np.array([e.value for e in est[peak:]])
    if not d2.max() > 0.0:  # no level mean distinguishable from zero: no weak error to fit
        return coupled[peak].level, 0.0, float(alpha_default)
    w = 1.0 / np.maximum(np.array([e.se for e in est[peak:]]), 1e-12 * max(d2.max(), 1e-300)) ** 2
    alphas = np.linspace(0.5, 1.0, 51) if len(lv) > 1 else np.array([alpha_default])
    best = None
    for alpha in alphas:
        x = float(M) ** (-2.0 * alpha * lv)
        a = max(0.0, float((w * x * d2).sum() / (w * x * x).sum()))
        loss = float((w * (d2 - a * x) ** 2).sum())
        if best is None or loss < best[0]:
            best = (loss, math.sqrt(a), float(alpha))
    return coupled[peak].level, best[1], best[2]


def coherence(moments: list[LevelMoments], lmin: int, M: int, peak: int, c: float, alpha: float, tail) -> float:
    """kappa = |E[P] - E[P_l]| / sum_(k > l) |E[Y_k]| on the asymptotic levels: how far the level means add up
    as aligned vectors (1) or partly cancel. Fitted (weighted least squares on the squares) from the run's
    remaining-bias estimates (``bias_of_level``) against the aligned sums of the fitted level means; between
    sqrt((1 - q) / (1 + q)) (independent directions, q = M^-alpha) and 1."""
    q = M ** (-alpha)
    num = den = 0.0
    for m in moments:
        if m.level < peak:
            continue
        b = bias_of_level(moments, m.level, tail)
        aligned2 = (c * M ** (-alpha * (m.level + 1)) / (1.0 - q)) ** 2
        if aligned2 <= 0.0:  # fitted level means of zero (c = 0): the level says nothing about kappa
            continue
        w = 1.0 / max(b.se, 1e-12 * aligned2) ** 2
        num, den = num + w * b.value * aligned2, den + w * aligned2**2
    kappa2 = num / den if den > 0 else 1.0
    return math.sqrt(min(1.0, max((1.0 - q) / (1.0 + q), kappa2)))


def _directions(u: Tensor, count: int, seed: int = 0) -> list[Tensor]:
    """``count`` vectors of unit RMS, orthogonal to ``u`` and to each other (empty when the payoff has too few
    components)."""
    n = u.numel()
    if count + 1 > n:
        return []
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([u[:, None], torch.randn(n, count, generator=g, dtype=torch.float64)], dim=1)
    q, _ = torch.linalg.qr(basis)
    return [q[:, i + 1] * math.sqrt(n) for i in range(count)]


def synthetic_laws(moments: list[LevelMoments], lmin: int, M: int, lmax: int) -> tuple[dict[int, LevelLaw], Rates]:
    """The per-pixel laws of levels Lmin..lmax from a run's moments, and the rates (alpha the weak-error fit's).

    The driver's decisions rest on the level means (its bias test extrapolates the finest ones) and on the
    remaining bias of each level, E[P] - E[P_l] (plain MC's). Up to the level of the largest coupled mean (the
    pre-asymptotic, well-sampled coarse levels) the remaining bias is the run's own estimate (``bias_of_level``,
    noise floor removed: the raw vector scaled to that squared norm). From there on the level means follow the
    weak-error model |E[Y_l]| = c M^(-alpha l) fitted to every asymptotic level at once (``weak_error_fit``): a
    fine level of a few samples no longer sets them alone, and the levels past the finest sampled one continue
    them. They add up with the run's coherence (``coherence``): a common component along the remaining bias at
    the peak plus independent directions, so that the remaining biases match the run's too. V_l is the run's,
    above the finest sampled level extrapolated with the fitted beta (V[P_l] as at the finest level)."""
    sampled = [m for m in moments if m.n > 1]
    if len(sampled) < 2 or [m.level for m in sampled] != list(range(lmin, sampled[-1].level + 1)):
        raise InputError("result: a prediction needs a run with at least two samples on each level from Lmin on, "
                         "and a coupled level")
    rates = fit_rates(sampled, lmin, M, lambda l: level_cost(M, l, lmin))
    tail = remaining_bias_weights(sampled, lmin, M, rates.alpha, alpha_se=rates.alpha_se)
    peak, c, alpha = weak_error_fit(sampled, lmin, M, rates.alpha)
    remaining = {}  # level -> E[P] - E[P_level]
    for m in sampled:
        if m.level <= peak:
            raw = sum(((1.0 if k.level > m.level else 0.0) + tail.get(k.level, 0.0)) * k.mean for k in sampled)
            norm2 = float(raw.pow(2).mean())
            target = bias_of_level(sampled, m.level, tail).value if tail else 0.0
            remaining[m.level] = raw * math.sqrt(target / norm2) if norm2 > 0 else torch.zeros_like(raw)
    # The asymptotic level means: a common part along u and an independent part, a^2 + b^2 = 1.
    u = remaining[peak] / max(float(remaining[peak].pow(2).mean().sqrt()), 1e-300)
    others = _directions(u, lmax - peak)
    kappa, q = coherence(sampled, lmin, M, peak, c, alpha, tail), M ** (-alpha)
    r = (1.0 - q) / (1.0 + q)
    a = math.sqrt(max(0.0, (kappa**2 - r) / (1.0 - r))) if others and r < 1 else 1.0
    b = math.sqrt(max(0.0, 1.0 - a * a))
    mean = {l: c * M ** (-alpha * l) * (a * u + (b * others[l - peak - 1] if others else 0.0))
            for l in range(peak + 1, lmax + 1)}
    for level in range(lmax, peak - 1, -1):
        remaining[level] = remaining.get(level + 1, torch.zeros_like(u)) + mean.get(level + 1, 0.0)
    by = {m.level: m for m in sampled}
    Ls = sampled[-1].level
    laws = {}
    for level in range(lmin, lmax + 1):
        if level == lmin:
            m = by[lmin]
            laws[level] = LevelLaw(m.mean, m.var, m.mean, _plain_var(by, lmin, lmin))
            continue
        mu = remaining[level - 1] - remaining[level]
        if level in by:
            v, w = by[level].var, _plain_var(by, level, lmin)
        else:
            v, w = by[Ls].var * M ** (-rates.beta * (level - Ls)), laws[Ls].fine_var
        laws[level] = LevelLaw(mu, v, laws[level - 1].fine_mean + mu, w)
    return laws, replace(rates, alpha=alpha)
