"""An exact oracle for MLMC's coupled chain, written from DESIGN.md's formulas and nothing of the sampler.

For a single-Gaussian posterior N(mu, C) the diffused posterior's score is affine, score(x) =
-Sigma_t^-1 (x - sqrt(g_t) mu) with Sigma_t = g_t C + (1 - g_t) I (g = gamma, the only schedule function
used), so one step of either sampler is affine in (x, xi), the seed's formula written with gamma:

    DDPM  x_s = sqrt(g_s/g_t) x + (sqrt(g_s/g_t) - sqrt(g_t/g_s)) score(x) + sqrt((1-g_s)/(1-g_t) (1-g_t/g_s)) xi
    DDIM  x_s = sqrt(g_s) x0_hat + sqrt(1-g_s) eps_hat,   eps_hat = -sqrt(1-g_t) score, x0_hat = (x + (1-g_t) score)/sqrt(g_t)

A coupled level stacks the fine and the coarse path into one state z = (x_f, x_c); per coarse step the M
fine noises xi_1..xi_M drive both (the coarse one through xi_c = sum_i w_i xi_i, with DESIGN's weights:
naive 1/sqrt(M); the seed's, proportional to c_i times the later sub-steps' sqrt(g_t/g_s)(1-g_s)/(1-g_t)),
so z' = F z + g + G xi and the joint law is a Gaussian recursion. It shares no code with
``CoupledLevelSampler``, ``step_coefficients``, ``coarse_noise_weights`` or ``GaussianOracle``.
"""

from __future__ import annotations

import numpy as np

from lightning_mlmc.problems import AnalyticSpec, exact_posterior
from lightning_mlmc.schedule import VPSchedule


def _gamma(t: float) -> tuple[float, float]:
    """(g, 1 - g) at t; 1 - g from the schedule's expm1 form, exact to relative precision near t = 0."""
    schedule = VPSchedule()
    return float(schedule.gamma(t)), float(schedule.sigma2(t))


class JointChain:
    def __init__(self, spec: AnalyticSpec):
        post = exact_posterior(spec)
        assert post.weights.shape[0] == 1, "a single-Gaussian posterior"
        self.mu = post.means[0].numpy()
        self.C = post.covs[0].numpy()
        self.n = self.mu.shape[0]
        self.eye = np.eye(self.n)

    def step(self, t: float, s: float, stochastic: bool):
        """(A, b, c): x_s = A x_t + b + c xi."""
        (gt, st), (gs, ss) = _gamma(t), _gamma(s)  # st = 1 - g_t, ss = 1 - g_s
        P = np.linalg.inv(gt * self.C + st * self.eye)
        # score(x) = -P x + P sqrt(gt) mu
        if stochastic:
            r = np.sqrt(gs / gt)
            q = r - np.sqrt(gt / gs)
            c = np.sqrt(max(ss / st * (1 - gt / gs), 0.0))
            return r * self.eye - q * P, q * P @ (np.sqrt(gt) * self.mu), c
        # DDIM: x_s = sqrt(gs) (x + (1-gt) score)/sqrt(gt) - sqrt(1-gs) sqrt(1-gt) score
        k1, k2 = np.sqrt(gs / gt) * st, -np.sqrt(ss) * np.sqrt(st)
        coef = k1 + k2  # of the score
        return np.sqrt(gs / gt) * self.eye - coef * P, coef * P @ (np.sqrt(gt) * self.mu), 0.0

    def law(self, times: np.ndarray, stochastic: bool = True):
        """Mean and covariance of one path on ``times`` from x_T ~ N(0, I)."""
        m, S = np.zeros(self.n), self.eye.copy()
        for t, s in zip(times[:-1], times[1:]):
            A, b, c = self.step(float(t), float(s), stochastic)
            m, S = A @ m + b, A @ S @ A.T + c * c * self.eye
        return m, S

    @staticmethod
    def weights(times_fine: np.ndarray, j: int, M: int, coupling: str) -> np.ndarray:
        if coupling == "naive":
            return np.full(M, M**-0.5)
        ts = times_fine[j * M:(j + 1) * M + 1]
        g, sg = np.array([_gamma(float(t)) for t in ts]).T  # gamma and 1 - gamma
        c = np.sqrt(np.maximum(sg[1:] / sg[:-1] * (1 - g[:-1] / g[1:]), 0.0))
        kappa = np.sqrt(g[:-1] / g[1:]) * sg[1:] / sg[:-1]  # sub-step r's x_t-coefficient
        w = np.array([c[i] * np.prod(kappa[i + 1:]) for i in range(M)])
        norm = np.linalg.norm(w)
        return w / norm if norm > 0 else np.full(M, M**-0.5)  # a noiseless coarse step: any weights

    def level(self, times_fine: np.ndarray, M: int, coupling: str = "naive", stochastic: bool = True):
        """Per-pixel (E[Y], Var[Y], E[P_c], Var[P_c]) of Y = x_f^2 - x_c^2 for the coupled level on
        ``times_fine`` (the coarse grid is every M-th point)."""
        n = self.n
        m = np.zeros(2 * n)
        S = np.block([[self.eye, self.eye], [self.eye, self.eye]])  # x_f = x_c = x_T
        for j in range((len(times_fine) - 1) // M):
            F, g = np.eye(2 * n), np.zeros(2 * n)
            Gf = []  # the fine path's response to each fine noise
            for i in range(M):
                k = j * M + i
                A, b, c = self.step(float(times_fine[k]), float(times_fine[k + 1]), stochastic)
                F[:n] = A @ F[:n]
                g[:n] = A @ g[:n] + b
                Gf = [A @ x for x in Gf] + [c * self.eye]
            Ac, bc, cc = self.step(float(times_fine[j * M]), float(times_fine[(j + 1) * M]), stochastic)
            F[n:] = np.hstack([np.zeros((n, n)), Ac])
            g[n:] = bc
            w = self.weights(times_fine, j, M, coupling)
            G = np.vstack([np.hstack(Gf), np.hstack([cc * wi * self.eye for wi in w])])
            m, S = F @ m + g, F @ S @ F.T + G @ G.T
        mf, mc = m[:n], m[n:]
        vf, vc, cfc = np.diag(S[:n, :n]), np.diag(S[n:, n:]), np.diag(S[:n, n:])
        mean = (mf**2 + vf) - (mc**2 + vc)
        var = 2 * vf**2 + 4 * mf**2 * vf + 2 * vc**2 + 4 * mc**2 * vc - 2 * (2 * cfc**2 + 4 * mf * mc * cfc)
        return mean, var, mc**2 + vc, 2 * vc**2 + 4 * mc**2 * vc
