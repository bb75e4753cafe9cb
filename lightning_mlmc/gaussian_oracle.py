"""Exact oracle for single-Gaussian posteriors: the sampler chain is linear, so its law is exact.

With a Gaussian posterior N(mu, C), the exact eps-prediction is affine in x:
eps(x, t) = sigma Sigma_t^{-1} (x - m mu), Sigma_t = m^2 C + sigma^2 I. One step of either sampler is
then x' = F x + g + c xi, and the mean and covariance of x after n steps follow from a linear
recursion. For MLMC the joint (fine, coarse) chain of a coupled level is again linear in (x_T, xi_j),
which gives the exact E[P_l - P_{l-1}] and V_l under every coupling, with no sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_mlmc.diffusion import StepCoefficients
from lightning_mlmc.mlmc.coupling import coarse_noise_weights
from lightning_mlmc.errors import InputError
from lightning_mlmc.problems import AnalyticSpec, exact_posterior
from lightning_mlmc.samplers import DEFAULT_SAMPLER, SAMPLERS, SamplerName, get_sampler
from lightning_mlmc.sampling import NoiseSource, StartDistribution, gaussian_start
from lightning_mlmc.schedule import TimeGrid, VPSchedule

Tensor = torch.Tensor


@dataclass(frozen=True)
class GaussianLaw:
    mean: Tensor  # (n,)
    cov: Tensor  # (n, n)

    @property
    def second_moment(self) -> Tensor:
        return self.mean**2 + torch.diagonal(self.cov)


class GaussianOracle:
    """Exact laws of the one-step sampler chains (DDPM, DDIM) for an analytic spec whose posterior is one Gaussian
    (a multistep sampler's law: ``affine_law``)."""

    def __init__(self, spec: AnalyticSpec, schedule: VPSchedule | None = None):
        post = exact_posterior(spec)
        if post.weights.shape[0] != 1:
            raise InputError("prior: the Gaussian oracle needs a single-component prior")
        self.mu, self.cov = post.means[0], post.covs[0]
        self.n = self.mu.shape[0]
        self.schedule = schedule or VPSchedule()
        self.eye = torch.eye(self.n, dtype=torch.float64)

    def affine_step(self, coef, k: int) -> tuple[Tensor, Tensor, float]:
        """(F, g, c) of step k: x' = F x + g + c xi."""
        t = coef.t[k]
        m, s2 = self.schedule.mean(t), self.schedule.sigma2(t)
        prec = torch.linalg.inv(m * m * self.cov + s2 * self.eye)
        lin = coef.eps[k] * s2.sqrt() * prec  # c_eps * sigma * Sigma^{-1}
        f = (1.0 + coef.a_minus_1[k]) * self.eye + lin
        g = -lin @ (m * self.mu)
        return f, g, float(coef.noise[k])

    def _start(self, start: StartDistribution) -> GaussianLaw:
        mean = torch.as_tensor(start.mean, dtype=torch.float64).reshape(-1).expand(self.n).clone()
        std = torch.as_tensor(start.std, dtype=torch.float64).reshape(-1).expand(self.n)
        return GaussianLaw(mean, torch.diag(std**2))

    def _coefficients(self, times: Tensor, sampler: SamplerName) -> StepCoefficients:
        """The one-step sampler's coefficients on ``times`` (a multistep sampler's step is not x' = F x + g + c xi)."""
        spec = get_sampler(sampler)
        if spec.multistep:
            one_step = ", ".join(name for name, s in SAMPLERS.items() if not s.multistep)
            raise InputError(f"sampler: the oracle's recursion is for one-step samplers ({one_step}), not {sampler!r}; "
                             "affine_law gives any sampler's exact law")
        return spec.coefficients(times, self.schedule)

    def law(self, steps: int, sampler: SamplerName = DEFAULT_SAMPLER, grid: TimeGrid | None = None,
            start: StartDistribution | None = None, times: Tensor | None = None) -> GaussianLaw:
        """Exact law of the sampler's output after ``steps`` steps (on ``times`` when given, e.g. PIADM's grid)."""
        start = start or gaussian_start()
        if times is None:
            times = (grid or TimeGrid()).times(steps, start.t, self.schedule)
        elif len(times) != steps + 1:
            raise InputError(f"times: expected {steps + 1} times for {steps} steps, got {len(times)}")
        coef = self._coefficients(times, sampler)
        law = self._start(start)
        mean, cov = law.mean, law.cov
        for k in range(steps):
            f, g, c = self.affine_step(coef, k)
            mean = f @ mean + g
            cov = f @ cov @ f.T + c * c * self.eye
        return GaussianLaw(mean, 0.5 * (cov + cov.T))

    def flow_law(self, start: StartDistribution | None = None) -> GaussianLaw:
        """Exact law of the probability-flow ODE's map from the start time to 0 applied to the start law: the
        flow of a Gaussian is x_0 = mu + Sigma_0^(1/2) Sigma_T^(-1/2) (x_T - m_T mu) with Sigma_t = m_t^2 C +
        sigma_t^2 I (all commuting), so every deterministic solver converges to this law as its steps shrink;
        its distance to the posterior is the error of the start distribution alone."""
        start = start or gaussian_start()
        law = self._start(start)
        m, s2 = float(self.schedule.mean(start.t)), float(self.schedule.sigma2(start.t))
        lam, u = torch.linalg.eigh(self.cov)
        a = u @ torch.diag((lam / (m * m * lam + s2)).sqrt()) @ u.T
        mean = self.mu + a @ (law.mean - m * self.mu)
        cov = a @ law.cov @ a.T
        return GaussianLaw(mean, 0.5 * (cov + cov.T))

    def level_moments(self, level: int, M: int = 2, sampler: SamplerName = DEFAULT_SAMPLER, coupling: str = "weighted",
                      payoff: str = "second_moment", grid: TimeGrid | None = None, data_std: float = 0.5,
                      start: StartDistribution | None = None, single: bool = False):
        """Exact per-pixel mean and variance of P_l - P_{l-1} (or of P_l alone when ``single``).

        Returns:
            (mean, var, var_fine): per-pixel tensors of shape (n,); var_fine is V[P_l].
        """
        start = start or gaussian_start()
        grid = grid or TimeGrid()
        n_f = M**level
        cf = self._coefficients(grid.times(n_f, start.t, self.schedule), sampler)
        law0 = self._start(start)
        if single or level == 0:
            law = self.law(n_f, sampler, grid, start)
            mean, var = _payoff_moments(law.mean, torch.diagonal(law.cov), payoff)
            return mean, var, var
        cc = self._coefficients(grid.times(n_f // M, start.t, self.schedule), sampler)
        n = self.n
        mf, mc = law0.mean.clone(), law0.mean.clone()
        # Joint covariance blocks; the fine and coarse paths start from the same x_T.
        sff, scc, sfc = law0.cov.clone(), law0.cov.clone(), law0.cov.clone()
        for j in range(n_f // M):
            # Fine sub-steps: x_f <- Phi x_f + h + sum_i B_i xi_i.
            phi, h = self.eye.clone(), torch.zeros(n, dtype=torch.float64)
            b_list, c_list = [], []
            for i in range(M):
                f, g, c = self.affine_step(cf, j * M + i)
                phi, h = f @ phi, f @ h + g
                b_list = [f @ b for b in b_list] + [c * self.eye]
                c_list.append(c)
            fc_, gc_, c_c = self.affine_step(cc, j)
            w = coarse_noise_weights(cf, j, M, coupling, data_std)  # xi_c = sum_i w_i xi_i
            noise_ff = sum(b @ b.T for b in b_list)
            noise_fc = sum(b * (c_c * wi) for b, wi in zip(b_list, w.tolist()))
            new_sff = phi @ sff @ phi.T + noise_ff
            new_scc = fc_ @ scc @ fc_.T + (c_c**2) * float((w**2).sum()) * self.eye
            new_sfc = phi @ sfc @ fc_.T + noise_fc
            sff, scc, sfc = new_sff, new_scc, new_sfc
            mf, mc = phi @ mf + h, fc_ @ mc + gc_
        d = lambda a: torch.diagonal(a)  # noqa: E731
        if payoff == "second_moment":
            saa, sbb, sab = d(sff), d(scc), d(sfc)
            mean = mf**2 + saa - mc**2 - sbb
            var = 2 * (saa**2 + sbb**2 - 2 * sab**2) + 4 * (mf**2 * saa - 2 * mf * mc * sab + mc**2 * sbb)
            var_fine = 2 * saa**2 + 4 * mf**2 * saa
        elif payoff == "mean":
            mean = mf - mc
            var = d(sff) + d(scc) - 2 * d(sfc)
            var_fine = d(sff)
        else:
            raise InputError(f"payoff: the oracle knows second_moment and mean, not {payoff!r}")
        return mean, var, var_fine


def _payoff_moments(mean: Tensor, var: Tensor, payoff: str):
    if payoff == "second_moment":
        return mean**2 + var, 2 * var**2 + 4 * mean**2 * var
    if payoff == "mean":
        return mean, var
    raise InputError(f"payoff: the oracle knows second_moment and mean, not {payoff!r}")


class _KeyedNoise(NoiseSource):
    """Noise for ``affine_law``: records the (stream, index) keys a sampler draws (``keys`` empty and growing,
    batch 1, zero draws), or returns unit vectors (row 1 + k n + c of draw k is e_c; row 0 is zero)."""

    def __init__(self, keys: list, event_shape, record: bool, stream=(), dtype=torch.float64, device="cpu"):
        self.keys, self.record, self.event_shape = keys, record, tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        rows = 1 if record else 1 + len(keys) * self.dim
        super().__init__(0, (rows, *self.event_shape), stream, dtype, device)
        self.pos = {key: i for i, key in enumerate(keys)}

    def substream(self, *keys: int) -> "_KeyedNoise":
        child = _KeyedNoise(self.keys, self.event_shape, self.record, (*self.stream, *keys), self.dtype, self.device)
        child.pos = self.pos
        return child

    def draw(self, index: int) -> Tensor:
        key = (self.stream, int(index))
        out = torch.zeros(self.shape[0], self.dim, dtype=self.dtype)
        if self.record:
            if key not in self.pos:
                self.pos[key] = len(self.keys)
                self.keys.append(key)
        else:
            k = self.pos[key]
            out[1 + k * self.dim + torch.arange(self.dim), torch.arange(self.dim)] = 1.0
        return out.reshape(self.shape).to(self.device)


def affine_law(run, event_shape) -> GaussianLaw:
    """The exact law of a sampler's output that is affine in its standard normal draws.

    With the exact score of a single-Gaussian problem every sampler here with a fixed schedule of network
    calls (the sequential samplers, PIADM with its fixed sweeps and corrector) maps its draws z affinely,
    x = A z + b, so x ~ N(b, A A^T) exactly. ``run(noise)`` must run the sampler with the given
    ``NoiseSource`` and return its samples (B, *event_shape); it is called twice: once with batch 1 to
    record which draws are used, then with one row per draw coordinate (row 0: all draws zero, giving b).
    Not for adaptive schemes whose decisions depend on the batch (Picard windows with a tolerance).
    """
    keys: list = []
    run(_KeyedNoise(keys, event_shape, record=True))
    out = run(_KeyedNoise(keys, event_shape, record=False)).reshape(1 + len(keys) * math.prod(event_shape), -1)
    out = out.to(torch.float64)
    b, a = out[0], (out[1:] - out[0]).T  # a: (n, number of draw coordinates)
    cov = a @ a.T
    return GaussianLaw(b, 0.5 * (cov + cov.T))
