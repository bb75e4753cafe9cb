"""PIADM (Chen, Ren, Ying, Rotskoff 2024) against exact answers: its grid, the sequential sampler as the fixed
point of its sweeps, its underdamped-Langevin corrector against an independent exact law, and its moments
against the exact posteriors of the Gaussian analytic problems."""

import math

import pytest
import torch
from tests.analytic_cases import bimodal2d, gaussian3d, gaussian_inpaint

from lightning_mlmc import ExactPosteriorEps, InputError, NoiseSource, VPSchedule, exact_posterior, sample
from lightning_mlmc.gaussian_oracle import GaussianOracle, affine_law
from lightning_mlmc.picard import CorrectorPlan, corrector_rule, ou_time, piadm_sample, piadm_times
from lightning_mlmc.picard.corrector import run_corrector
from lightning_mlmc.schedule import TimeGrid


def _setup(spec, batch=32):
    return ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (batch, *spec.shape)


# ----------------------------------------------------------------------------------------------
# The grid.


def test_logsnr_blocks_are_equal_log_snr_steps():
    sched = VPSchedule()
    times = piadm_times(4, 8, delta=1e-3)
    assert len(times) == 4 * 8 + 2 and times[0] == 1.0 and times[-2] == 1e-3 and times[-1] == 0
    lam = sched.log_snr(times[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((32,), float(lam[1] - lam[0]), dtype=torch.float64))


def test_ou_blocks_follow_the_source():
    """Equal OU blocks; equal steps of kappa = h / points in all but the last block, whose steps shrink
    geometrically, each at most kappa times the OU time left, down to s(delta)."""
    blocks, points, delta = 4, 6, 1e-3
    times = piadm_times(blocks, points, delta=delta, clock="ou")
    s = ou_time(times[:-1])
    h = float(ou_time(1.0)) / blocks
    kappa = h / points
    uniform = s[: (blocks - 1) * points + 1]
    torch.testing.assert_close(uniform.diff(), torch.full_like(uniform.diff(), -kappa))
    last = s[(blocks - 1) * points:]
    assert math.isclose(float(last[0]), h, rel_tol=1e-12) and math.isclose(float(last[-1]), float(ou_time(delta)),
                                                                           rel_tol=1e-9)
    ratio = last[1:] / last[:-1]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))  # geometric
    assert torch.all(last[:-1] - last[1:] <= kappa * last[1:] * (1 + 1e-12))
    assert float(ratio[0]) < 1 / (1 + kappa) * 1.05  # and no more steps than that rule needs


@pytest.mark.parametrize("clock", ["logsnr", "ou"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_k_equal_points_is_the_sequential_sampler_on_the_grid(sampler, clock):
    model, y, shape = _setup(bimodal2d())
    blocks, points = 3, 5
    times = piadm_times(blocks, points, clock=clock)
    ref = sample(model, y, NoiseSource(2, shape), times=times, sampler=sampler).samples
    last = len(times) - 2 - (blocks - 1) * points  # the OU clock's last block holds more points
    devs = []
    for k in (1, 2, 3, max(points, last)):
        out = piadm_sample(model, y, NoiseSource(2, shape), blocks=blocks, points=points, sweeps=k, sampler=sampler,
                           clock=clock)
        devs.append(float((out.samples - ref).abs().max()))
        assert out.rounds == blocks * k + 1  # K sweeps per block, then Tweedie's step
        assert out.nfe == k * (len(times) - 2) + 1
    assert devs[-1] < 1e-12 and devs[0] > 1e-3


def test_bad_arguments():
    model, y, shape = _setup(bimodal2d())
    run = lambda **kw: piadm_sample(model, y, NoiseSource(0, shape), **{"blocks": 2, "points": 3, "sweeps": 1,  # noqa: E731
                                                                        **kw})
    for kw, field in [({"sweeps": 0}, "sweeps"), ({"points": 0}, "points"), ({"clock": "vp"}, "clock"),
                      ({"delta": 0.0}, "delta"), ({"delta": 2.0}, "delta"), ({"corrector": True}, "corrector"),
                      ({"sampler": "ddim", "corrector": True, "corrector_steps": 0}, "corrector_steps"),
                      ({"sampler": "ddim", "corrector": True, "corrector_accuracy": 0.0}, "corrector_accuracy"),
                      ({"sampler": "ddim", "corrector": True, "corrector_sweeps": 0}, "corrector_sweeps")]:
        with pytest.raises(InputError, match=field):
            run(**kw)


# ----------------------------------------------------------------------------------------------
# The corrector against an independent exact law.


def _uld_oracle_step(gamma: float, h: float):
    """Exact transition of dx = v ds, dv = (-gamma v + g) ds + sqrt(2 gamma) dB over h with g held fixed, by
    matrix exponentials (Van Loan for the noise): (x, v) -> A (x, v) + b g + w, w ~ N(0, Q), per coordinate."""
    f = torch.tensor([[0.0, 1.0], [0.0, -gamma]], dtype=torch.float64)
    aug = torch.zeros(3, 3, dtype=torch.float64)
    aug[:2, :2], aug[1, 2] = f, 1.0
    e = torch.linalg.matrix_exp(aug * h)
    a, b = e[:2, :2], e[:2, 2]
    gg = torch.tensor([[0.0, 0.0], [0.0, 2.0 * gamma]], dtype=torch.float64)
    van = torch.zeros(4, 4, dtype=torch.float64)
    van[:2, :2], van[:2, 2:], van[2:, 2:] = -f, gg, f.T
    ev = torch.linalg.matrix_exp(van * h)
    q = ev[2:, 2:].T @ ev[:2, 2:]
    return a, b, 0.5 * (q + q.T)


def _corrector_law(mu, cov_t, start_mean, start_cov, gamma, h, steps):
    """Law of x after ``steps`` corrector steps on the target N(mu, cov_t), x(0) ~ N(start), v(0) ~ N(0, I)."""
    n = mu.shape[0]
    a, b, q = _uld_oracle_step(gamma, h)
    prec = torch.linalg.inv(cov_t)
    eye = torch.eye(n, dtype=torch.float64)
    # z = (x, v); g = -prec (x - mu).
    t = torch.cat([torch.cat([a[0, 0] * eye - b[0] * prec, a[0, 1] * eye], 1),
                   torch.cat([a[1, 0] * eye - b[1] * prec, a[1, 1] * eye], 1)], 0)
    c = torch.cat([b[0] * prec @ mu, b[1] * prec @ mu])
    noise = torch.kron(q, eye)
    mean = torch.cat([start_mean, torch.zeros(n, dtype=torch.float64)])
    cov = torch.block_diag(start_cov, eye)
    for _ in range(steps):
        mean, cov = t @ mean + c, t @ cov @ t.T + noise
    return mean[:n], cov[:n, :n]


class _Counter:
    nfe = rounds = 0


def test_corrector_has_the_exact_law_of_underdamped_langevin():
    """The corrector's samples against the exact law of its chain (matrix exponentials, independent of the
    corrector's closed forms) on the diffused Gaussian posterior: within 4.5 standard errors. The chain moves
    the start far (in standard errors) toward p_t, so a corrector that does nothing fails."""
    spec = gaussian3d()
    model, y, _ = _setup(spec)
    sched = VPSchedule()
    t = 0.3
    m, sig = float(sched.mean(t)), float(sched.sigma(t))
    post = exact_posterior(spec)
    mu_t, cov_t = m * post.means[0], m * m * post.covs[0] + sig**2 * torch.eye(3, dtype=torch.float64)
    n = 20_000
    noise = NoiseSource(11, (n, 3))
    x0 = 2.0 + 0.5 * noise.substream(99).draw(0)  # a wrong start: N(2, 0.25 I)
    plan = CorrectorPlan(gamma=2.0, h=0.1, steps=20, sweeps=5, blocks=4)
    x = run_corrector(model, y, x0, t, sig, plan, noise, _Counter())
    mean, cov = _corrector_law(mu_t, cov_t, torch.full((3,), 2.0, dtype=torch.float64),
                               0.25 * torch.eye(3, dtype=torch.float64), 2.0, 0.1, 20)
    se_mean = cov.diagonal().sqrt() / math.sqrt(n)
    assert float(((x.mean(0) - mean) / se_mean).abs().max()) < 4.5
    var = x.var(0)
    se_var = cov.diagonal() * math.sqrt(2.0 / (n - 1))
    assert float(((var - cov.diagonal()) / se_var).abs().max()) < 4.5
    assert float(((mean - 2.0) / se_mean).abs().max()) > 50  # the chain moved: doing nothing is caught
    assert float(((mean - mu_t) / se_mean).abs().max()) < float(((2.0 - mu_t) / se_mean).abs().max()) / 3


def test_corrector_picard_sweeps_reach_the_sequential_run():
    """Each corrector block solved with as many sweeps as steps is the sequential chain, however it is blocked;
    fewer sweeps differ."""
    spec = gaussian3d()
    model, y, _ = _setup(spec)
    sig = float(VPSchedule().sigma(0.3))
    noise = NoiseSource(5, (16, 3))
    x0 = noise.substream(7).draw(0)
    run = lambda plan: run_corrector(model, y, x0, 0.3, sig, plan, noise, _Counter())  # noqa: E731
    seq = run(CorrectorPlan(1.5, 0.2, 12, sweeps=1, blocks=12))  # blocks of one step: the sequential chain
    torch.testing.assert_close(run(CorrectorPlan(1.5, 0.2, 12, sweeps=12, blocks=1)), seq, rtol=0, atol=1e-12)
    torch.testing.assert_close(run(CorrectorPlan(1.5, 0.2, 12, sweeps=4, blocks=3)), seq, rtol=0, atol=1e-12)
    assert float((run(CorrectorPlan(1.5, 0.2, 12, sweeps=2, blocks=3)) - seq).abs().max()) > 1e-4
    counter = _Counter()
    run_corrector(model, y, x0, 0.3, sig, CorrectorPlan(1.5, 0.2, 12, sweeps=2, blocks=3), noise, counter)
    assert counter.rounds == 6 and counter.nfe == 24


def test_corrector_rule():
    """L = 1 / sigma^2: time 1 / sqrt(L), friction 2 sqrt(L), ceil(sqrt(d) / accuracy) steps."""
    plan = corrector_rule(sigma=0.5, dim=64, accuracy=1.0)
    assert plan.steps == 8 and math.isclose(plan.gamma, 4.0) and math.isclose(plan.h * plan.steps, 0.5)
    assert plan.sweeps == 8 and plan.rounds == 8
    assert corrector_rule(0.5, 64, accuracy=0.5, sweeps=2).steps == 16
    assert corrector_rule(0.5, 64, accuracy=0.5, sweeps=2).rounds == 2


# ----------------------------------------------------------------------------------------------
# Moments against the exact posterior.


def _err(law, post) -> float:
    """RMS over pixels of the error in E[x^2] (the MLMC payoff) of a Gaussian law."""
    return float((law.second_moment - post.second_moment).pow(2).mean().sqrt())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_exact_error_falls_with_the_sweeps_to_the_sequential_error(sampler):
    """The exact law of PIADM's output (it is affine in its draws): its error against the posterior falls with
    K to that of the sequential sampler on the same grid, which the Gaussian oracle gives independently."""
    spec = gaussian_inpaint(3, 3)
    model, y, _ = _setup(spec)
    post = exact_posterior(spec)
    blocks, points = 4, 8
    times = piadm_times(blocks, points)
    oracle = GaussianOracle(spec)
    seq = oracle.law(len(times) - 1, sampler, times=times)
    errs = [_err(affine_law(lambda nz: piadm_sample(model, y, nz, blocks=blocks, points=points, sweeps=k,
                                                    sampler=sampler).samples, spec.shape), post) for k in (1, 2, 4, 8)]
    assert errs[0] > 3 * errs[-1] and errs[1] > errs[-1]
    assert math.isclose(errs[-1], _err(seq, post), rel_tol=1e-8)


def test_ou_clock_sde_needs_sweeps_for_its_long_last_block():
    """PIADM-SDE on the source's OU clock: the last block holds all the geometric steps toward delta (17 for
    3 x 4), the stiff stretch of the exact score, where Picard's error grows before it falls. K = points (4)
    is far from the sequential sampler on the grid, 12 sweeps are near it, and as many sweeps as the last
    block's steps give the oracle's exact law of sequential DDPM on that grid (independent of the sweeps)."""
    spec = gaussian_inpaint(3, 3)
    model, y, _ = _setup(spec)
    post = exact_posterior(spec)
    blocks, points = 3, 4
    times = piadm_times(blocks, points, clock="ou")
    last = len(times) - 2 - (blocks - 1) * points
    assert last == 17
    seq = _err(GaussianOracle(spec).law(len(times) - 1, "ddpm", times=times), post)
    errs = {k: _err(affine_law(lambda nz: piadm_sample(model, y, nz, blocks=blocks, points=points, sweeps=k,
                                                       sampler="ddpm", clock="ou").samples, spec.shape), post)
            for k in (points, 12, last)}
    assert errs[points] > 1000 * seq and abs(errs[12] - seq) < 0.01 * seq
    assert math.isclose(errs[last], seq, rel_tol=1e-8)


def test_the_corrector_lowers_the_error_and_converges_as_its_steps_grow():
    """PIADM-ODE: with the corrector the exact error is below the predictor's alone at the same K, and the
    corrected law converges as the corrector's steps double (differences shrink at least like h)."""
    spec = gaussian_inpaint(4, 4)
    model, y, _ = _setup(spec)
    post = exact_posterior(spec)
    kw = dict(blocks=8, points=16, sweeps=3, sampler="ddim")
    law = lambda **c: affine_law(lambda nz: piadm_sample(model, y, nz, **kw, **c).samples, spec.shape)  # noqa: E731
    plain = _err(law(), post)
    laws = [law(corrector=True, corrector_steps=m) for m in (2, 4, 8)]
    assert _err(laws[1], post) < 0.75 * plain
    d1 = float((laws[1].second_moment - laws[0].second_moment).abs().max())
    d2 = float((laws[2].second_moment - laws[1].second_moment).abs().max())
    assert d2 < 0.6 * d1


def test_piadm_ode_beats_the_sequential_sampler_in_rounds_at_equal_error():
    """The claim of the source: PIADM-ODE with the corrector reaches an error against the exact posterior in
    fewer rounds than the sequential sampler needs steps (the oracle's exact law of DDIM on uniform and
    log-SNR grids)."""
    spec = gaussian_inpaint(4, 4)
    model, y, _ = _setup(spec)
    post = exact_posterior(spec)
    kw = dict(blocks=8, points=16, sweeps=3, sampler="ddim", corrector=True, corrector_sweeps=2)
    err = _err(affine_law(lambda nz: piadm_sample(model, y, nz, **kw).samples, spec.shape), post)
    rounds = piadm_sample(model, y, NoiseSource(0, (1, *spec.shape)), **kw).rounds
    oracle = GaussianOracle(spec)
    for grid in (TimeGrid("uniform"), TimeGrid("logsnr")):
        assert _err(oracle.law(2 * rounds, "ddim", grid), post) > err  # even twice the steps fall short


@pytest.mark.parametrize("sampler, make, n, blocks, points, corrector", [
    ("ddim", gaussian3d, 4000, 8, 16, True),
    ("ddim", lambda: gaussian_inpaint(3, 3), 4000, 8, 16, True),
    ("ddpm", gaussian3d, 1000, 4, 32, False),
])
def test_moments_converge_to_the_exact_posterior_within_se(sampler, make, n, blocks, points, corrector):
    """Monte Carlo: with K = points (and the corrector for the ODE) the sample mean and second moment of every
    pixel are within 4.5 standard errors of the exact posterior's; with K = 1 they are not."""
    spec = make()
    model, y, shape = _setup(spec, batch=n)
    post = exact_posterior(spec)
    z = {}
    for k in (1, points):
        out = piadm_sample(model, y, NoiseSource(1, shape), blocks=blocks, points=points, sweeps=k, sampler=sampler,
                           corrector=corrector, corrector_sweeps=2 if corrector else None)
        x = out.samples.reshape(n, -1)
        z1 = ((x.mean(0) - post.mean) / (x.std(0) / math.sqrt(n))).abs().max()
        z2 = (((x**2).mean(0) - post.second_moment) / ((x**2).std(0) / math.sqrt(n))).abs().max()
        z[k] = float(max(z1, z2))
    assert z[points] < 4.5 and z[1] > 10, z
