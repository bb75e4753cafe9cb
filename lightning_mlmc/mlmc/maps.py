"""The posterior mean and pixel-std maps to a stated accuracy (payoff ``mean_std``), by the delta method.

The std map is a nonlinear function of the moments, s_i = sqrt(m2_i - m1_i^2). To first order its error is
linear in the moments' errors, ds_i = (dm2_i - 2 m1_i dm1_i) / (2 s_i): the error of the sample mean of the
payoff g_i(x) = (x_i^2 - 2 a_i x_i) / (2 b_i) at a = m1, b = s. So MLMC with the payoff [x, g(x)] (2n
components) controls the mean map's and the std map's errors together: eps bounds their RMS over both maps.
The linearization point (a, b) comes from a first run at 4 eps with payoff ``moments`` (1/16 of the cost); it
only sets the weights of the error criterion, never the estimate: m1 and m2 are recovered exactly from the
components (m2 = 2 b g + 2 a m1) and s = sqrt(max(m2 - m1^2, 0)). Pixels whose std is below eps are weighted
as if it were eps (there the std is known to about eps, and the linearization would not hold).

Chosen over translating an eps of the std map into one of the moments (eps_moments = eps_std times the smallest
2 s_i / sqrt(1 + 4 m1_i^2)): that makes the whole run as accurate as its flattest pixel needs; the weighted
payoff spends where the std map's error is made (README "The mean and std maps").
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lightning_mlmc.mlmc.result import MLMCResult

Tensor = torch.Tensor
FIRST_EPS = 4.0  # the linearization run's eps, in units of eps


def linearized_payoff(a: Tensor, b: Tensor, clip: float | None = None):
    """f(x) = [x, (x^2 - 2 a x) / (2 b)] per pixel (x flattened, (N, n) -> (N, 2n))."""
    a, b = a.to(torch.float64), b.to(torch.float64)

    def f(x: Tensor) -> Tensor:
        x = x.clamp(-clip, clip) if clip is not None else x
        x64 = x.to(torch.float64)
        return torch.cat([x64, (x64 * x64 - 2 * a.to(x64.device) * x64) / (2 * b.to(x64.device))], dim=1)

    return f


def split_moments(estimate, n: int) -> tuple[Tensor, Tensor]:
    est = torch.as_tensor(estimate, dtype=torch.float64)
    return est[:n], est[n:]


def mean_std_maps(run, config, levels, eps: float, **driver_kw) -> MLMCResult:
    """The mean and std maps to RMSE eps (over both maps): the linearization run (payoff moments, 4 eps), then
    the run on the linearized payoff. ``run``: the driver call (``config.run_mlmc``'s), ``levels``: the
    moments levels. The result's estimate is [mean map, std map]; ``maps`` holds both with their RMSE
    estimates; ``nfe`` counts both runs (the first as ``pilot_nfe``)."""
    first = run(config, levels, FIRST_EPS * eps, **{k: v for k, v in driver_kw.items() if k != "state_path"})
    n = len(first.estimate) // 2
    m1, m2 = split_moments(first.estimate, n)
    a, b = m1, (m2 - m1**2).clamp_min(0.0).sqrt().clamp_min(eps)
    second = run(config, levels.with_payoff(linearized_payoff(a, b, config.clip)), eps, **driver_kw)
    c1, c2 = split_moments(second.estimate, n)
    mean, moment2 = c1, 2 * b * c2 + 2 * a * c1
    std = (moment2 - mean**2).clamp_min(0.0).sqrt()
    return replace(second, estimate=torch.cat([mean, std]).tolist(), nfe=second.nfe + first.nfe,
                   pilot_nfe=second.pilot_nfe + first.nfe, nfe_counted=second.nfe_counted + first.nfe_counted,
                   savings=second.nfe_mc / (second.nfe + first.nfe),
                   wall_seconds=second.wall_seconds + first.wall_seconds,
                   maps={"mean_rmse": map_rmse(second, slice(0, n)), "std_rmse": map_rmse(second, slice(n, 2 * n)),
                         "linearized_at": {"eps": FIRST_EPS * eps, "nfe": first.nfe}})


def map_rmse(result: MLMCResult, part: slice) -> float:
    """The RMSE estimate of one map: its components' variance sum_l V_l,i / N_l averaged over its pixels, plus
    the run's squared bias bound (two standard errors up; the bias is estimated over both maps and the larger
    share is not known, so each map is charged all of it)."""
    var = sum(float((m.var[part] / m.n).mean()) for m in result.moments if m.n > 0)
    return math.sqrt(var + result.bias_estimate**2) if math.isfinite(result.bias_estimate) else math.inf
