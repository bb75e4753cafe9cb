"""What the driver reads from the level sums, per pixel and then averaged over pixels (DESIGN.md section 4):
level moments, the debiased RMS level mean, the remaining bias of a level (extrapolated by the weak rate
and pooled over the finest levels), V[P_l] pooled from every sample of P_l's law, and the cheapest plain
Monte Carlo estimator that meets eps by these estimates (the honest ``nfe_mc``).

The RMS over pixels of a level's sample mean has a noise floor: E[mean_i(ybar_i^2)] = mean_i(E[Y_i]^2) +
mean_i(V_i) / N. Every squared-bias estimate here subtracts it, and states its uncertainty (two standard
errors of the squared estimate), so that a test neither passes on a lucky draw nor refines on noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lightning_mlmc.mlmc.sums import LevelSums, varies

Tensor = torch.Tensor


@dataclass(frozen=True)
class LevelMoments:
    """Per-pixel sample moments of one level (float64 tensors of shape (pixels,))."""

    level: int
    n: int
    mean: Tensor  # of Y_l = P_l - P_(l-1) (P_l at Lmin)
    var: Tensor
    fine_sum: Tensor  # sums of P_l and P_l^2 over the fine paths
    fine_sq: Tensor
    coarse_sum: Tensor  # sums of P_(l-1) and its square over the coarse paths (zero at Lmin)
    coarse_sq: Tensor
    kurtosis: float  # pixel-averaged sample kurtosis of Y_l
    nonzero: float = math.inf  # pixel-averaged count of samples whose Y_l is not exactly zero
    floored: bool = False  # mean and var raised to Giles' floors (``floor_untrusted``): the level is not trusted
    single: tuple | None = None  # (count, sum, sum of squares) of the single fine paths (antithetic pairs' members)
    refines: bool = True  # the level refines the grid (its mean decays at the weak rate; not a network switch)


MIN_NONZERO = 2  # a level whose variance rests on fewer nonzero differences shows (nearly) no variation
NORMAL_NONZERO = 10  # a level mean over fewer nonzero differences is far from normal (see ``near_normal``)


def shows_variation(m: LevelMoments) -> bool:
    """Whether a level's sample variance rests on at least ``MIN_NONZERO`` nonzero differences per pixel.

    A discontinuous payoff (a digital option, an indicator) makes most level differences exactly zero: a
    pilot of a few dozen samples often sees none or one, and its mean and variance (zero) say nothing about
    the level. Continuous payoffs are nonzero on every sample."""
    return m.nonzero >= MIN_NONZERO


def sizing_variance(m: "LevelMoments") -> float:
    """V_l one standard error above its estimate, V_l (1 + sqrt((kurtosis - 1) / N_l)) with the kurtosis at
    least a Gaussian's 3: N_l sized from a V_l of a few samples would come out short (V_l from five samples
    is often half the truth), so a level with few samples gets more until its variance is known."""
    var = float(m.var.mean())
    return var * (1.0 + math.sqrt(max(m.kurtosis, 3.0) - 1.0) / math.sqrt(max(m.n, 1)))


def near_normal(m: LevelMoments) -> bool:
    """Whether a level's mean rests on at least ``NORMAL_NONZERO`` nonzero differences per pixel: a sum of
    fewer rare jumps (a discontinuous payoff's fine levels) is far from normal, so two standard errors are no
    confidence bound for it and its logarithm says little about the weak rate; such a level's mean neither
    fails the bias test on its own nor enters the fit of alpha (it still counts in the pooled bias). A level whose
    samples mostly differ from zero (a continuous payoff) is not sparse, however few they are."""
    return m.nonzero >= min(NORMAL_NONZERO, 0.5 * m.n)


def level_moments(level: int, s: LevelSums, refines: bool = True) -> LevelMoments:
    n = max(s.n, 1)
    mean = s.sums["y1"] / n
    var = (s.sums["y2"] / n - mean**2).clamp_min(0.0) * (n / max(n - 1, 1))  # unbiased
    m2, m3, m4 = s.sums["y2"] / n, s.sums["y3"] / n, s.sums["y4"] / n
    central2 = (m2 - mean**2).clamp_min(0.0)
    central4 = m4 - 4 * m3 * mean + 6 * m2 * mean**2 - 3 * mean**4
    ok = varies(central2, m2)
    kurt = float((central4[ok] / central2[ok] ** 2).mean()) if ok.any() else 3.0
    single = (float(s.sums["s0"][0]), s.sums["s1"], s.sums["s2"]) if s.sums["s0"].numel() else None
    return LevelMoments(level, s.n, mean, var, s.sums["f1"], s.sums["f2"], s.sums["c1"], s.sums["c2"], kurt,
                        float(s.sums["nz"].mean()), single=single, refines=refines)


def floor_untrusted(moments: list[LevelMoments], lmin: int, M: int, alpha: float, beta: float) -> list[LevelMoments]:
    """Giles' floors for the coupled levels that show (nearly) no variation (``shows_variation``).

    Giles' drivers (mlmc.m, pymlmc) set ``ml[l] = max(ml[l], 0.5 ml[l-1] / M^alpha)`` and
    ``Vl[l] = max(Vl[l], 0.5 Vl[l-1] / M^beta)`` "to cope with possible zero values ... when there are few
    samples". Here a level without variation gets its per-pixel mean from its nearest trusted coupled
    neighbour scaled by the fitted rates and halved (from below: 0.5 mean_(l-1) / M^alpha, as Giles; from above,
    when the level below is not trusted either: 0.5 mean_(l+1) M^alpha), unless its own is larger in RMS, and
    its per-pixel variance likewise (with beta). A level with no trusted coupled neighbour keeps its values;
    the driver must then sample it further before the bias test may pass (``untrusted``)."""
    by = {m.level: m for m in moments}
    out = dict(by)
    coupled = [m.level for m in moments if m.level > lmin]
    for level in coupled:  # from below first, in order, so a floored level floors the next one (Giles)
        m = by[level]
        if shows_variation(m):
            continue
        below = out.get(level - 1) if level - 1 > lmin else None
        above = next((by[l] for l in coupled if l > level and shows_variation(by[l])), None)
        if below is not None and (shows_variation(below) or below.floored):
            ref, scale_m, scale_v = below, 0.5 / M**alpha, 0.5 / M**beta
        elif above is not None:
            k = above.level - level
            ref, scale_m, scale_v = above, 0.5 * M ** (k * alpha), 0.5 * M ** (k * beta)
        else:
            continue
        mean = m.mean if float(m.mean.pow(2).mean()) >= scale_m**2 * float(ref.mean.pow(2).mean()) else scale_m * ref.mean
        out[level] = replace(m, mean=mean, var=torch.maximum(m.var, scale_v * ref.var), floored=True)
    return [out[m.level] for m in moments]


def untrusted(moments: list[LevelMoments], lmin: int) -> list[LevelMoments]:
    """The coupled levels that show (nearly) no variation (floored or not)."""
    return [m for m in moments if m.level > lmin and not shows_variation(m)]


@dataclass(frozen=True)
class SquaredBias:
    """An estimate of mean_i(b_i^2), the squared bias averaged over pixels, with its uncertainty."""

    value: float  # unbiased: mean_i(bhat_i^2 - Var(bhat_i)), floored at 0
    se: float  # standard error of the squared estimate

    @property
    def upper(self) -> float:
        """One standard error above: what the driver sizes the variance against."""
        return self.value + self.se

    @property
    def lower(self) -> float:
        """Two standard errors below: a bias test fails outright only beyond this."""
        return max(0.0, self.value - 2.0 * self.se)

    @property
    def bound(self) -> float:
        """Two standard errors above: the bias term of ``rmse_bound``."""
        return self.value + 2.0 * self.se


def squared_bias(b: Tensor, var_b: Tensor) -> SquaredBias:
    """mean_i(b_i^2) from an estimate ``b`` (pixels,) whose entries have variances ``var_b``.

    bhat_i^2 - Var_i is unbiased for b_i^2 and has variance 4 b_i^2 Var_i + 2 Var_i^2 (Gaussian bhat_i); the
    standard error of the pixel average is taken as the average of the pixels' (fully correlated pixels:
    the conservative case, since neighbouring pixels of an image err together).
    """
    raw = b.pow(2) - var_b
    b2 = raw.clamp_min(0.0)
    se = torch.sqrt(4.0 * b2 * var_b + 2.0 * var_b.pow(2)).mean()
    return SquaredBias(max(0.0, float(raw.mean())), float(se))


def debiased_rms(m: LevelMoments) -> float:
    """sqrt(mean_i(E[Y_i]^2)) estimated without the noise floor mean_i(V_i) / N."""
    return math.sqrt(squared_bias(m.mean, m.var / max(m.n, 1)).value)


def remaining_bias_weights(moments: list[LevelMoments], lmin: int, M: int, alpha: float, depth: int = 3,
                           alpha_se: float = 0.0) -> dict[int, float]:
    """Coefficients c_l with b_L = sum_l c_l E[Y_l]: the bias left after the finest level L.

    With a weak rate alpha, E[P] - E[P_L] = sum_(k > L) E[Y_k] = E[Y_(L-r)] M^(-(r+1) alpha) / (1 - M^-alpha)
    for each of the finest ``depth`` coupled levels L - r; Giles takes the largest of these extrapolations.
    Here they are pooled with weights proportional to their precision: the sampling variance
    (pixel-averaged V_l / N_l) plus the model's, an extrapolation over r levels being uncertain by
    r ln(M) sd(alpha) in relative terms. The well-sampled coarser levels carry the estimate where alpha
    is well determined, the finest level where it is not.
    """
    coupled = [m for m in moments if m.level > lmin and m.n > 1 and m.refines]  # a network switch does not decay
    coupled = coupled[-depth:]
    if not coupled:
        return {}
    L = moments[-1].level
    tail = 1.0 / (M**alpha - 1.0)
    scale = {m.level: tail * M ** (-(L - m.level) * alpha) for m in coupled}
    def variance(m):
        sampling = float((m.var / m.n).mean()) * scale[m.level] ** 2
        model = float(m.mean.pow(2).mean()) * scale[m.level] ** 2 * ((L - m.level) * math.log(M) * alpha_se) ** 2
        return max(sampling + model, 1e-300)

    prec = {m.level: 1.0 / variance(m) for m in coupled}
    total = sum(prec.values())
    return {l: scale[l] * prec[l] / total for l in scale}


def bias_of_level(moments: list[LevelMoments], level: int, tail: dict[int, float], tail_rel_sd: float = 0.0) -> SquaredBias:
    """Squared bias of plain P_level: sum of the sampled E[Y_k] above it plus the extrapolated tail
    (``remaining_bias_weights``), with the variance of that linear combination of independent levels and,
    ``tail_rel_sd``, the tail's relative model uncertainty (from alpha's)."""
    coef = {m.level: (1.0 if m.level > level else 0.0) + tail.get(m.level, 0.0) for m in moments}
    b = sum(coef[m.level] * m.mean for m in moments)
    var = sum(coef[m.level] ** 2 * m.var / max(m.n, 1) for m in moments)
    if tail_rel_sd > 0:
        t = sum(tail.get(m.level, 0.0) * m.mean for m in moments)
        var = var + (t * tail_rel_sd) ** 2
    return squared_bias(b, var)


def tail_relative_sd(M: int, alpha: float, alpha_se: float) -> float:
    """Relative sd of the tail factor 1 / (M^alpha - 1) when alpha has standard error ``alpha_se``."""
    return math.log(M) * M**alpha / (M**alpha - 1.0) * alpha_se


def pooled_plain_variance(moments: list[LevelMoments], level: int, lmin: int) -> tuple[float, int]:
    """(pixel-averaged V[P_level], samples): every path with P_level's law is a sample of it, the fine
    paths of level ``level`` and the coarse paths of level ``level + 1`` (independent streams)."""
    by_level = {m.level: m for m in moments}
    s1 = s2 = None
    n = 0
    for m, which in ((by_level.get(level), "fine"), (by_level.get(level + 1), "coarse")):
        if m is None or m.n == 0 or (which == "coarse" and m.level <= lmin):
            continue
        a, b = (m.fine_sum, m.fine_sq) if which == "fine" else (m.coarse_sum, m.coarse_sq)
        s1, s2, n = (a, b, m.n) if s1 is None else (s1 + a, s2 + b, n + m.n)
    if n < 2:
        return math.nan, n
    mean = s1 / n
    return float(((s2 / n - mean**2).clamp_min(0.0) * (n / (n - 1))).mean()), n


@dataclass(frozen=True)
class PlainMC:
    """A plain Monte Carlo estimator: ``samples`` paths of ``steps`` steps (level ``level``), or that many
    antithetic pairs of them (``antithetic``)."""

    level: int
    steps: int
    samples: int
    cost: float  # samples x cost of one plain sample
    bias2: float  # the squared-bias bound it was sized with (upper confidence)
    var: float  # V[P_level] (of a pair mean when antithetic)
    meets_eps: bool
    antithetic: bool = False


def single_path_variance(m: LevelMoments) -> float:
    """Pixel-averaged variance of one fine path of the level (not of a pair mean): what plain MC without
    antithetic pairs would face."""
    n, s1, s2 = m.single
    return float(((s2 / n - (s1 / n) ** 2).clamp_min(0.0) * (n / max(n - 1, 1))).mean()) if n > 1 else math.nan


def plain_mc_alternative(moments: list[LevelMoments], lmin: int, M: int, eps: float, alpha: float,
                         plain_cost, steps_of=None, finest: int | None = None, alpha_se: float = 0.0,
                         cautious: bool = False, pairs: bool = False) -> PlainMC:
    """The fewest-cost plain MC that meets eps by these estimates: over the sampled levels, N_l =
    V[P_l] / (eps^2 - B_l^2) with B_l^2 the squared bias of P_l (each level its own bias/variance split), up
    to level ``finest`` (default: all). B_l^2 is the point estimate (noise floor removed) for the honest
    comparison, which must not favour MLMC, and one standard error above it when ``cautious`` (a plain-MC
    finish that has to meet eps itself), the extrapolated tail's uncertainty from alpha's included as in
    MLMC's own bias test. With antithetic pairs (``pairs``: a sample is a pair mean, ``plain_cost`` a pair's)
    plain MC with single paths (half the cost, their own variance) is a candidate too, except for a finish
    (``cautious``), which draws what the levels draw. When none meets eps, the finest level is returned with
    ``meets_eps`` False."""
    tail = remaining_bias_weights(moments, lmin, M, alpha, alpha_se=alpha_se)
    rel = tail_relative_sd(M, alpha, alpha_se) if cautious else 0.0
    best, fallback = None, None
    for m in moments:
        if finest is not None and m.level > finest:
            break
        var, n = pooled_plain_variance(moments, m.level, lmin)
        if not math.isfinite(var) or (cautious and n * m.mean.numel() < RELIABLE_VALUES):
            continue  # a finish sized from the variance of a few samples would run short (or far too long)
        bias = bias_of_level(moments, m.level, tail, rel)
        b2 = bias.upper if cautious else bias.value
        steps = steps_of(m.level) if steps_of else M**m.level
        room = eps**2 - b2
        kinds = [(var, plain_cost(m.level), pairs)]
        if pairs and not cautious and m.single is not None:
            kinds.append((single_path_variance(m), plain_cost(m.level) / 2, False))
        for v, c, anti in kinds:
            if room > 0 and math.isfinite(v):
                n = max(2, math.ceil(v / room))
                cand = PlainMC(m.level, steps, n, n * c, b2, v, True, anti)
                if best is None or cand.cost < best.cost:
                    best = cand
        room = eps**2 - bias.value
        n = max(2, math.ceil(var / room)) if room > 0 else 0
        fallback = PlainMC(m.level, steps, n, n * plain_cost(m.level), bias.value, var, False, pairs)
    return best or fallback


RELIABLE_VALUES = 32  # values (samples x pixels) a variance needs to size a plain-MC finish (about 25% error)
COUPLING_PAYS = 0.25  # V_l below this share of V[P_l]: the coupling works (the first asymptotic level)


def asymptotic_level(moments: list[LevelMoments], lmin: int) -> int | None:
    """The first coupled level whose V_l is below ``COUPLING_PAYS`` V[P_l], or None.

    Below it the fine and coarse paths are barely correlated and the level means are pre-asymptotic (on the
    diffusion problems they change sign and grow there): a bias extrapolated from them can be badly wrong,
    so the bias test accepts only an L above this level. Variances are well estimated from few samples,
    unlike the small means the extrapolation needs, which makes this the reliable signal."""
    for m in moments:
        if m.level <= lmin or m.n < 2 or not m.refines:
            continue
        var_plain, _ = pooled_plain_variance(moments, m.level, lmin)
        if float(m.var.mean()) < COUPLING_PAYS * var_plain:
            return m.level
    return None
