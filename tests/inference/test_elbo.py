"""ELBO against closed forms: exact posterior, a wrong guide, minibatch scaling with a global
latent, beta, free bits and annealing schedules."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.inference import ELBO, CyclicalAnnealing, LinearAnnealing


def gaussian_kl(m1, c1, m2, c2):
    """KL(N(m1, c1) || N(m2, c2)) for full covariances, batched over m1's leading dims."""
    d = m1.shape[-1]
    c2_inv = torch.linalg.inv(c2)
    diff = m2 - m1
    return 0.5 * (
        torch.trace(c2_inv @ c1)
        + torch.einsum("...i,ij,...j->...", diff, c2_inv, diff)
        - d
        + torch.logdet(c2)
        - torch.logdet(c1)
    )


@pytest.mark.parametrize("num_particles", [1, 5])
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_exact_posterior_gives_log_likelihood(linear_gaussian, num_particles, analytic_kl):
    x = linear_gaussian.sample(25)
    elbo = ELBO(num_particles=num_particles, analytic_kl=analytic_kl)
    value = -elbo.loss(linear_gaussian.model, linear_gaussian.guide, x)
    assert value == pytest.approx(linear_gaussian.log_px(x).sum().item(), abs=1e-8)


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_wrong_guide_matches_closed_form(analytic_kl):
    from conftest import LinearGaussian

    lg = LinearGaussian(orthogonal=True)
    lg.full_cov, lg.offset, lg.scale_factor = False, 0.3, 1.5
    x = lg.sample(10)
    mean, cov = lg.posterior(x)
    q_cov = torch.diag(cov.diagonal() * lg.scale_factor**2)
    # ELBO = log p(x) - KL(q || p(z | x)), per datapoint
    exact = (lg.log_px(x) - gaussian_kl(mean + lg.offset, q_cov, mean, cov)).sum()
    elbo = ELBO(num_particles=20000, analytic_kl=analytic_kl)
    value = -elbo.loss(lg.model, lg.guide, x)
    # One particle's value has a standard deviation of ~10 nats here (measured), so the
    # 20k-particle mean has a standard error of ~0.075: 0.4 is a 5-sigma bound.
    assert value == pytest.approx(exact.item(), abs=0.4)
    assert value < lg.log_px(x).sum().item()


class GlobalLocal:
    """theta ~ N(0, 1) global; z_n ~ N(0, 1) local; x_n ~ N(theta + z_n, 1).
    Delta guides make the ELBO deterministic, so minibatch scaling can be checked exactly."""

    def __init__(self):
        self.theta = torch.tensor(0.3, requires_grad=True)
        self.z_loc = torch.linspace(-1, 1, 12).requires_grad_()

    def model(self, x, idx):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(theta + z, 1.0), obs=x)

    def guide(self, x, idx):
        pyro.sample("theta", dist.Delta(self.theta))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.z_loc[idx]))


def test_minibatch_scaling_counts_global_terms_once():
    pair = GlobalLocal()
    x = torch.linspace(-2, 3, 12)
    idx = torch.arange(12)
    elbo = ELBO()
    full = elbo.differentiable_loss(pair.model, pair.guide, x, idx)
    full_grad = torch.autograd.grad(full, [pair.theta, pair.z_loc])
    # Average of the scaled minibatch objectives over a partition = the full objective.
    model = pvae.scale_to_data(pair.model, 12)
    guide = pvae.scale_to_data(pair.guide, 12)
    batches = idx.reshape(4, 3)
    losses = [elbo.differentiable_loss(model, guide, x[b], b) for b in batches]
    mean_loss = torch.stack(losses).mean()
    torch.testing.assert_close(mean_loss, full)
    torch.testing.assert_close(torch.autograd.grad(mean_loss, [pair.theta, pair.z_loc]), full_grad)
    # ... and the reported bound is the full-data scale.
    exact = (
        dist.Normal(pair.theta + pair.z_loc, 1.0).log_prob(x).sum()
        + dist.Normal(0.0, 1.0).log_prob(pair.z_loc).sum()
        + dist.Normal(0.0, 1.0).log_prob(pair.theta)
    )
    assert -full.item() == pytest.approx(exact.item())


def test_global_term_scaled_wrongly_would_fail():
    """The scaling test above can fail: scaling the global term by N/B breaks the identity."""
    pair = GlobalLocal()
    x = torch.linspace(-2, 3, 12)
    full = ELBO().differentiable_loss(pair.model, pair.guide, x, torch.arange(12))
    model = pyro.poutine.scale(pair.model, 4.0)
    guide = pyro.poutine.scale(pair.guide, 4.0)
    b = torch.arange(12).reshape(4, 3)
    wrong = torch.stack([ELBO().differentiable_loss(model, guide, x[i], i) for i in b]).mean()
    assert not torch.allclose(wrong, full)


def test_beta_weights_the_kl_but_not_the_reported_bound(linear_gaussian):
    x = linear_gaussian.sample(8)
    linear_gaussian.offset = 0.5
    results = {}
    for beta in [0.0, 1.0, 3.0]:
        pyro.set_rng_seed(0)
        elbo = ELBO(beta=beta)
        loss = elbo.differentiable_loss(linear_gaussian.model, linear_gaussian.guide, x)
        results[beta] = (loss.item(), elbo.current_beta())
    pyro.set_rng_seed(0)
    bound = -ELBO().loss(linear_gaussian.model, linear_gaussian.guide, x)
    # Same noise: loss(beta) is linear in beta with slope = the analytic KL, which is positive.
    slope = results[3.0][0] - results[1.0][0]
    assert slope / 2 == pytest.approx(results[1.0][0] - results[0.0][0], rel=1e-6)
    assert slope > 0
    assert bound == pytest.approx(-results[1.0][0], rel=1e-9)


def test_free_bits_stop_the_kl_gradient_below_the_threshold(linear_gaussian):
    x = linear_gaussian.sample(8)
    mean, cov = linear_gaussian.posterior(x)
    loc = mean.clone().requires_grad_()
    log_scale = (0.5 * cov.diagonal().log()).clone().requires_grad_()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def model_no_obs(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))

    kl_per_dim = (
        torch.distributions.kl_divergence(
            dist.Normal(loc, log_scale.exp()), dist.Normal(0.0, torch.ones(()))
        )
        .mean(0)
        .detach()
    )
    high = kl_per_dim.max().item() + 1.0
    loss = ELBO(free_bits=high).differentiable_loss(model_no_obs, guide, x)
    assert loss.item() == pytest.approx(8 * 2 * high)  # N * D * lambda: KL held at lambda
    grads = torch.autograd.grad(loss, [loc, log_scale])
    assert all(torch.all(g == 0) for g in grads)
    low = kl_per_dim.min().item() / 2
    loss = ELBO(free_bits=low).differentiable_loss(model_no_obs, guide, x)
    assert loss.item() == pytest.approx(8 * kl_per_dim.sum().item(), rel=1e-6)


def test_schedules():
    linear = LinearAnnealing(num_steps=10)
    assert [linear(s) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    cyclical = CyclicalAnnealing(period=10, ratio=0.5)
    assert [cyclical(s) for s in (0, 2, 5, 9, 10, 12)] == [0.0, 0.4, 1.0, 1.0, 0.0, 0.4]


def test_annealing_follows_the_step_counter(linear_gaussian):
    x = linear_gaussian.sample(4)
    elbo = ELBO(beta=LinearAnnealing(num_steps=4))
    betas = []
    for _ in range(6):
        betas.append(elbo.current_beta())
        elbo.loss_and_grads(linear_gaussian.model, linear_gaussian.guide, x)
    assert betas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert elbo.state_dict() == {"step": 6}


def test_works_inside_pyro_svi():
    from conftest import LinearGaussian

    lg = LinearGaussian(orthogonal=True)
    x = lg.sample(200)
    loc = pyro.param("loc", torch.zeros(lg.z_dim, dtype=x.dtype))
    del loc

    def guide(x):  # learns a shared offset on top of the exact posterior mean
        mean, cov = lg.posterior(x)
        with pyro.plate("data", x.shape[0]):
            shift = pyro.param("loc", torch.zeros(lg.z_dim, dtype=x.dtype))
            pyro.sample("z", dist.Normal(mean + shift + 1.0, cov.diagonal().sqrt()).to_event(1))

    svi = pyro.infer.SVI(lg.model, guide, pyro.optim.Adam({"lr": 0.05}), loss=ELBO())
    initial_gap = lg.log_px(x).sum().item() + svi.evaluate_loss(x)
    for _ in range(300):
        svi.step(x)
    # The optimum cancels the +1 offset.
    torch.testing.assert_close(pyro.param("loc"), -torch.ones(2, dtype=x.dtype), atol=0.05, rtol=0)
    # The gap log p(x) - ELBO = sum_n 0.5 sum_d (shift_d + 1)^2 / var_d: ~1e3 nats at the
    # start, a few nats once the shift is within 0.05 of -1 (the 500-particle estimate has
    # ~0.5 nats of noise).
    gap = lg.log_px(x).sum().item() + ELBO(num_particles=500).loss(lg.model, guide, x)
    assert initial_gap > 1000 and abs(gap) < 30, (initial_gap, gap)


def test_non_reparameterised_guide_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="guide site 'c'"):
        ELBO().loss(model, guide, torch.zeros(3))


def test_vectorised_and_looped_particles_agree(linear_gaussian):
    """Both agree with the exact ELBO = log p(x) - sum_n KL(q_n || p(z | x_n)) (guide mean
    shifted by 0.7: a gap of ~42 nats) within 5 standard errors, the SE being the sd of
    one-particle values (100 draws) over sqrt(particles); the looped band is below 10% of the
    gap, so a 20% error in the gap lies at least 2 bands (10 SE) away."""
    lg = linear_gaussian
    x = lg.sample(6)
    lg.offset = 0.7
    mean, cov = lg.posterior(x)
    exact_post = dist.MultivariateNormal(mean, covariance_matrix=cov)
    q = dist.MultivariateNormal(mean + lg.offset, covariance_matrix=cov)
    gap = float(torch.distributions.kl_divergence(q, exact_post).sum())
    exact = float(lg.log_px(x).sum()) - gap
    singles = torch.tensor([-ELBO().loss(lg.model, lg.guide, x) for _ in range(100)])
    sd = float(singles.std())
    a = -ELBO(num_particles=4000).loss(lg.model, lg.guide, x)
    b = -ELBO(num_particles=200, vectorize_particles=False).loss(lg.model, lg.guide, x)
    assert abs(a - exact) < 5 * sd / 4000**0.5
    assert abs(b - exact) < 5 * sd / 200**0.5
    assert 5 * sd / 200**0.5 < 0.1 * gap


def test_unvectorisable_model_names_the_site():
    w = torch.randn(3, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            mean = z.view(x.shape[0], 2) @ w.T  # breaks with a particle dimension
            pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    x = torch.zeros(5, 3)
    ELBO().loss(model, guide, x)  # one particle: fine
    with pytest.raises(pvae.VectorizationError, match="after site 'z'"):
        ELBO(num_particles=4).loss(model, guide, x)
    # the loop fallback works
    ELBO(num_particles=4, vectorize_particles=False).loss(model, guide, x)


# ---- estimator="stl" (Roeder et al. 2017) -------------------------------------------------


def _grads(engine, pair, x, names):
    from test_importance import run_engine

    value, grads, _, _ = run_engine(engine, pair, x)
    return value, torch.cat([grads[n].reshape(-1) for n in names])


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_stl_guide_gradient_vanishes_at_the_exact_posterior(analytic_kl):
    from test_importance import GUIDE_PARAMS, MODEL_PARAMS, make_pair

    pair, x = make_pair(n=4)  # mean-field guide at the exact posterior (orthogonal W)
    values, guide_grads, model_grads = {}, {}, {}
    for estimator in ("reparam", "stl"):
        engine = ELBO(num_particles=3, analytic_kl=analytic_kl, estimator=estimator)
        pyro.set_rng_seed(0)
        values[estimator], guide_grads[estimator] = _grads(engine, pair, x, GUIDE_PARAMS)
        pyro.set_rng_seed(0)
        _, model_grads[estimator] = _grads(engine, pair, x, MODEL_PARAMS)
    assert values["stl"] == values["reparam"]  # same draws: the same bound, analytic KL or not
    if not analytic_kl:  # every log w = log p(x) at the exact posterior
        assert values["stl"] == pytest.approx(pair.lg.log_px(x).sum().item(), abs=1e-8)
    assert guide_grads["stl"].abs().max() < 1e-10
    assert guide_grads["reparam"].abs().max() > 1e-2  # the score term: zero in mean only
    # the model's parameters (not in the prior) get the same gradient either way
    torch.testing.assert_close(model_grads["stl"], model_grads["reparam"])


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_stl_gradient_is_unbiased_for_the_elbo(analytic_kl):
    """Away from the optimum, the mean of the STL gradient over many draws equals the mean of
    the reparameterised one (the analytic-KL one when ``analytic_kl``)."""
    from test_importance import GUIDE_PARAMS, MODEL_PARAMS, make_pair

    pair, x = make_pair(n=3, offset=0.4, scale_factor=1.6)
    repeats, particles = 30, 200
    names = MODEL_PARAMS + GUIDE_PARAMS
    samples = {}
    for estimator in ("reparam", "stl"):
        engine = ELBO(num_particles=particles, analytic_kl=analytic_kl, estimator=estimator)
        samples[estimator] = torch.stack(
            [_grads(engine, pair, x, names)[1] for _ in range(repeats)]
        )
    mean = {e: s.mean(0) for e, s in samples.items()}
    error = {e: s.std(0) / math.sqrt(repeats) for e, s in samples.items()}
    z = (mean["stl"] - mean["reparam"]).abs() / (error["stl"] ** 2 + error["reparam"] ** 2).sqrt()
    # 23 gradient elements, each a difference of two means of 30 draws: 4.5 standard errors
    # leaves a false alarm below 1% (t with 29 degrees of freedom).
    assert z.max() < 4.5, z
    guide = slice(-8, None)  # loc (3, 2) and log_scale (2,): far from zero here
    assert (mean["reparam"][guide].abs() / error["reparam"][guide]).max() > 20


def test_stl_changes_neither_the_loss_nor_the_bound_under_beta_and_free_bits():
    from test_importance import make_pair

    pair, x = make_pair(n=4, offset=0.3, scale_factor=1.2)
    records = {}
    for estimator in ("reparam", "stl"):
        pyro.set_rng_seed(0)
        engine = ELBO(beta=0.5, free_bits=0.3, estimator=estimator)
        record = engine.train_step(pair.model, pair.guide, x)
        records[estimator] = (record.loss, record.bound)
    assert records["stl"] == records["reparam"]


def test_elbo_estimator_is_checked():
    with pytest.raises(ValueError, match="estimator 'dreg'.*'reparam', 'stl'"):
        ELBO(estimator="dreg")


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_free_bits_under_minibatches_match_the_hand_computed_objective(beta):
    """Minibatches of B < N: the free-bits KL is N * sum_d max(lambda, mean_batch KL_nd), with
    the clamp on the batch mean (not per datapoint) and the N/B scale applied once; the
    likelihood counts N/B times and the reported bound is the plain scaled ELBO."""
    n, d, free_bits = 12, 2, 0.3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    # Per-datapoint KLs straddle lambda in both dimensions: in dimension 0 the batch means sit
    # above lambda while some datapoints sit below it, in dimension 1 the means sit below.
    loc = torch.stack([torch.linspace(-2.0, 2.0, n), torch.linspace(-0.4, 0.4, n)], -1).double()
    scale = torch.full((n, d), 0.9, dtype=torch.float64)

    def model(x, idx):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x, idx):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc[idx], scale[idx]).to_event(1))

    kl = torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0))
    scaled_model, scaled_guide = pvae.scale_to_data(model, n), pvae.scale_to_data(guide, n)
    engine = ELBO(beta=beta, free_bits=free_bits)
    for b in torch.arange(n).reshape(4, 3).T:  # interleaved: each batch spans the range
        batch_kl = kl[b]  # (B, D)
        assert (batch_kl[:, 0] < free_bits).any() and (batch_kl[:, 0] > free_bits).any()
        log_lik = n / len(b) * dist.Normal(0.0, 1.0).log_prob(x[b]).sum()
        held = n * batch_kl.mean(0).clamp(min=free_bits).sum()
        loss = engine.differentiable_loss(scaled_model, scaled_guide, x[b], b)
        assert loss.item() == pytest.approx((-log_lik + beta * held).item(), rel=1e-12)
        # Clamping per datapoint, or scaling by N/B twice, would give these instead:
        per_datapoint = n * batch_kl.clamp(min=free_bits).mean(0).sum()
        assert abs((held - per_datapoint).item()) > 0.05
        bound = -ELBO().loss(scaled_model, scaled_guide, x[b], b)
        assert bound == pytest.approx((log_lik - n / len(b) * batch_kl.sum()).item(), rel=1e-12)
