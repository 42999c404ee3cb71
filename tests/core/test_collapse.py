"""KL per dimension, mutual information and the collapse report against closed forms: the
linear-Gaussian pair with its exact (diagonal) posterior, and guides that ignore x in chosen
dimensions."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import LinearGaussian
from pyro import poutine

from pvae.diagnostics import (
    CollapseReport,
    KLPerDim,
    collapse_report,
    kl_per_dim,
    mutual_information,
)
from pvae.models import VAE, HierarchicalVAE

X = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))


def gaussian_kl(mean, var):
    """KL(N(mean, var) || N(0, 1)), elementwise."""
    return 0.5 * (var + mean**2 - 1.0 - torch.log(var))


@pytest.fixture
def exact_diagonal():
    lg = LinearGaussian(x_dim=5, z_dim=2, orthogonal=True)
    lg.full_cov = False
    return lg


def test_kl_per_dim_matches_closed_form_with_exact_posterior(exact_diagonal):
    lg = exact_diagonal
    x = lg.sample(300)
    result = kl_per_dim(lg.model, lg.guide, x, batch_size=128)
    assert isinstance(result, KLPerDim) and result.analytic and not result.marginal
    mean, cov = lg.posterior(x)
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-12)  # orthogonal W
    expected = gaussian_kl(mean, cov.diagonal())
    assert result.per_datapoint.shape == (300, 2)
    torch.testing.assert_close(result.per_datapoint, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.kl, expected.mean(0))
    assert result.total == pytest.approx(float(expected.sum(1).mean()))


def test_monte_carlo_kl_agrees_with_analytic(exact_diagonal):
    lg = exact_diagonal
    x = lg.sample(300)
    exact = kl_per_dim(lg.model, lg.guide, x).kl
    mc = kl_per_dim(lg.model, lg.guide, x, analytic=False, num_particles=200)
    assert not mc.analytic
    # Monte-Carlo error: per (n, d) the estimator has sd <~ 1.5 nats over 200 draws and 300
    # datapoints -> sd of the mean ~ 1.5 / sqrt(6e4) ~ 0.006; tolerance 0.05.
    torch.testing.assert_close(mc.kl, exact, atol=0.05, rtol=0)


def test_full_covariance_guide_gives_marginal_kls(linear_gaussian):
    lg = linear_gaussian  # full covariance guide, correlated posterior
    x = lg.sample(200)
    result = kl_per_dim(lg.model, lg.guide, x)
    assert result.marginal and result.per_datapoint.shape == (200, 2)
    mean, cov = lg.posterior(x)
    torch.testing.assert_close(result.per_datapoint, gaussian_kl(mean, cov.diagonal()))


def masked_pair(mask, fixed_loc=0.3, fixed_scale=0.5):
    """Model: z ~ N(0, I_4), x ~ N(z, 1). Guide: q(z_d | x) = N(x_d, 0.5^2) where mask[d], else
    N(fixed_loc, fixed_scale^2) whatever x (a dimension that ignores x)."""
    mask = torch.tensor(mask)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = torch.where(mask, x, torch.full_like(x, fixed_loc))
        scale = torch.where(mask, torch.full_like(x, 0.5), torch.full_like(x, fixed_scale))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def test_dimension_that_ignores_x_has_its_fixed_kl_and_no_information():
    model, guide = masked_pair([True, False, True, True])
    result = kl_per_dim(model, guide, X)
    fixed = gaussian_kl(torch.tensor(0.3), torch.tensor(0.25))
    assert torch.allclose(result.per_datapoint[:, 1], fixed.double().expand(400))
    mi = mutual_information(guide, X, max_points=300, num_samples=4)
    assert mi.num_points == 300 and mi.per_dim is not None
    assert abs(float(mi.per_dim[1])) < 1e-6  # q(z_1 | x_j) is the same for every j
    # the informative dims: I(x_d; z_d) with x_d ~ N(0, 1), z_d = x_d + N(0, 0.25) is
    # 0.5 log(1 + 1/0.25) = 0.80 nats; the estimator over M = 300 points is biased down a little
    expected = 0.5 * math.log(5.0)
    for d in (0, 2, 3):
        assert expected - 0.2 < float(mi.per_dim[d]) < expected + 0.1
    assert mi.total == pytest.approx(3 * expected, abs=0.5)


def test_mutual_information_is_zero_when_the_guide_ignores_x():
    _, guide = masked_pair([False, False, False, False])
    mi = mutual_information(guide, X)
    assert abs(mi.total) < 1e-6


def test_collapse_report_flags_collapsed_dims_and_says_so():
    # dims 1 and 3 of q are exactly the prior N(0, 1): collapsed
    model, guide = masked_pair([True, False, True, False], fixed_loc=0.0, fixed_scale=1.0)
    report = collapse_report(model, guide, X)
    assert isinstance(report, CollapseReport)
    layer = report.layers["z"]
    assert layer.collapsed.tolist() == [False, True, False, True]
    assert report.collapsed == {"z": [1, 3]}
    assert layer.active.tolist() == [True, False, True, False]
    assert layer.fraction_below == pytest.approx(0.5, abs=0.02)  # (n, d) pairs with KL < 0.01
    assert "partial posterior collapse" in report.verdict.lower()
    assert "dimensions 1, 3 of z collapsed" in report.verdict
    assert str(report) == report.verdict


def test_collapse_report_names_dims_that_ignore_x_but_pay_kl():
    model, guide = masked_pair([True, False, True, True])  # dim 1 at N(0.3, 0.25): KL 0.52
    report = collapse_report(model, guide, X)
    assert report.collapsed == {"z": []}
    assert report.layers["z"].inactive_dims == [1]
    assert "no posterior collapse" in report.verdict.lower()
    assert "No information about x in dimension 1 of z" in report.verdict


def test_total_collapse_verdict():
    model, guide = masked_pair([False] * 4, fixed_loc=0.0, fixed_scale=1.0)
    report = collapse_report(model, guide, X)
    assert report.layers["z"].fraction_below == 1.0
    assert "total posterior collapse" in report.verdict.lower()


@pytest.mark.parametrize("inference", ["bottom-up", "ladder"])
def test_hierarchical_layers_are_reported_in_order(inference):
    hvae = HierarchicalVAE(
        x_dim=4, z_dims=(3, 2), hidden=(8, 8), likelihood="gaussian", inference=inference
    )
    report = collapse_report(hvae.model, hvae.guide, X[:100], num_particles=32)
    assert list(report.layers) == ["z1", "z2"]
    assert report.layers["z1"].dims == 3 and report.layers["z2"].dims == 2
    for layer in report.layers.values():
        assert torch.isfinite(layer.kl).all() and (layer.kl > -0.05).all()
    single = kl_per_dim(hvae.model, hvae.guide, X[:100], site="z2", num_particles=4)
    assert single.site == "z2" and single.dims == 2
    # the per-layer KLs add up to the ELBO's KL: E_q[sum_l log q(z_l | .) - log p(z_l | .)],
    # here a Monte-Carlo average over 400 guide draws of the 100 datapoints
    elbo_kl = 0.0
    with torch.no_grad():
        for _ in range(400):
            guide_trace = poutine.trace(hvae.guide).get_trace(X[:100])
            model_trace = poutine.trace(poutine.replay(hvae.model, guide_trace)).get_trace(X[:100])
            for name in ("z1", "z2"):
                value = guide_trace.nodes[name]["value"]
                log_q = guide_trace.nodes[name]["fn"].log_prob(value)
                elbo_kl += float((log_q - model_trace.nodes[name]["fn"].log_prob(value)).mean())
    elbo_kl /= 400
    layers_kl = sum(float(layer.kl.sum()) for layer in report.layers.values())
    # both are estimates: the layers' (32 particles, analytic where the order allows) and the
    # reference (4e4 draws) each have a Monte-Carlo error below 0.05 nats here
    assert layers_kl == pytest.approx(elbo_kl, abs=0.1)


def test_errors_name_the_site():
    vae = VAE(x_dim=4, z_dim=2, hidden=(8,), likelihood="gaussian")
    with pytest.raises(ValueError, match="no latent site 'w'.*z"):
        kl_per_dim(vae.model, vae.guide, X, site="w")
    with pytest.raises(ValueError, match="no latent site 'w'"):
        mutual_information(vae.guide, X, site="w")


# --------------------------------------------------------------------------------------------
# Latent relevance (ARD-VAE score).


def linear_decoder_pair(relevant=(0, 3, 5), z_dim=8, x_dim=20, seed=0):
    """A guide whose 8 latent means all move with x, and a linear decoder that reads only
    ``relevant`` latent dims (the other weight columns are zero)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(x_dim, z_dim)
    for scale, d in zip((3.0, 2.0, 1.0), relevant, strict=True):
        W[:, d] = scale * torch.randn(x_dim, generator=g) / math.sqrt(x_dim)
    B = torch.randn(x_dim, z_dim, generator=g) / math.sqrt(x_dim)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ B, 0.3).to_event(1))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, 0.5).to_event(1), obs=x)

    @torch.no_grad()
    def decode(z):
        return z @ W.T

    return model, guide, decode, W, B


def test_latent_relevance_finds_the_dims_the_decoder_reads():
    from pvae.diagnostics import latent_relevance

    model, guide, decode, W, B = linear_decoder_pair()
    x = torch.randn(500, 20, generator=torch.Generator().manual_seed(1))
    result = latent_relevance(guide, decode, x, model=model)
    assert sorted(result.relevant) == [0, 3, 5]
    assert result.ranking[:3] == [0, 3, 5]  # weights 3, 2, 1 and similar variances
    assert result.cumulative[2] == pytest.approx(1.0) and result.cumulative[1] < 0.99
    assert (result.activity > 0.1).all()  # activity alone does not separate them
    assert result.kl is not None and result.kl.shape == (8,)
    # the score by hand: v_d * sum_pixels |W_pd|^2 (the Jacobian of a linear decoder is W)
    mu = x @ B
    v = (mu.double() ** 2 + 0.09).mean(0)
    torch.testing.assert_close(result.scores, v * W.double().pow(2).sum(0))
    # a given prior variance replaces the aggregate one
    flat = latent_relevance(guide, decode, x, prior_variance=torch.ones(8))
    torch.testing.assert_close(flat.scores, W.double().pow(2).sum(0))


def test_latent_relevance_on_a_zoo_vae_matches_finite_differences():
    from pvae.diagnostics import latent_relevance
    from pvae.diagnostics.relevance import _jacobian_columns

    vae = VAE(x_dim=4, z_dim=3, hidden=(8,), likelihood="bernoulli")
    result = latent_relevance(vae.guide, vae.decode, (X > 0).float())
    assert result.scores.shape == (3,) and (result.scores > 0).all()
    mu = torch.randn(10, 3, dtype=torch.float64)
    vae = vae.double()
    exact = _jacobian_columns(vae.decode, mu, 1e-5)
    h = 1e-5
    for d in range(3):
        e = torch.zeros_like(mu)
        e[:, d] = h
        fd = ((vae.decode(mu + e) - vae.decode(mu - e)) / (2 * h)).abs()
        torch.testing.assert_close(exact[d], fd, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Figures.


def test_figures_write_pngs(tmp_path):
    from matplotlib.figure import Figure

    from pvae.diagnostics import active_units, latent_relevance
    from pvae.diagnostics.figures import activity_bars, kl_bars, relevance_curve

    model, guide = masked_pair([True, False, True, False], fixed_loc=0.0, fixed_scale=1.0)
    report = collapse_report(model, guide, X, mutual_info=False)
    model2, guide2, decode, _, _ = linear_decoder_pair()
    x = torch.randn(200, 20, generator=torch.Generator().manual_seed(1))
    figures = {
        "kl.png": kl_bars(report, path=tmp_path / "kl.png"),
        "kl_single.png": kl_bars(
            kl_per_dim(model, guide, X), log=True, path=tmp_path / "kl_single.png"
        ),
        "activity.png": activity_bars(report, path=tmp_path / "activity.png"),
        "units.png": activity_bars(active_units(guide, X), path=tmp_path / "units.png"),
        "relevance.png": relevance_curve(
            latent_relevance(guide2, decode, x), path=tmp_path / "sub" / "relevance.png"
        ),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        path = tmp_path / ("sub" if name == "relevance.png" else "") / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically
    with pytest.raises(ValueError, match="nothing to plot"):
        kl_bars({})


@pytest.mark.filterwarnings("ignore:model and guide sample their latents in different orders")
def test_a_bottom_up_layer_with_a_negative_kl_term_is_not_called_collapsed():
    """z1's conditional prior is evaluated at a z2 the guide drew from z1 itself, so the z1
    term E_q[log q(z1|x) - log p(z1|z2)] is about -0.5 nats per dimension (not a KL) while
    q(z1|x) follows x. "KL < threshold" alone would call z1 collapsed."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2, 0.1).to_event(1))
            pyro.sample("x", dist.Normal(z1, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x, 0.1).to_event(1))
            pyro.sample("z2", dist.Normal(z1, 0.01).to_event(1))

    x = torch.randn(400, 2)
    report = collapse_report(model, guide, x, num_particles=4, mutual_info=False)
    layer = report.layers["z1"]
    assert (layer.kl < -0.4).all() and layer.active.all()
    assert not layer.collapsed.any()
    assert layer.conditional and not report.layers["z2"].conditional
    assert "Not counted as collapsed: dimensions 0, 1 of z1" in report.verdict


def test_a_true_kl_below_threshold_is_collapse_even_with_a_wide_prior():
    """Prior N(0, 10^2), q = N(0.3 x, 10^2): KL ~ 5e-4 nats but activity ~ 0.09 (activity is
    in latent units, KL is not). The term is a KL, so the dimension counts as collapsed."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 10.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.3 * x, 10.0).to_event(1))

    x = torch.randn(400, 1, generator=torch.Generator().manual_seed(2))
    report = collapse_report(model, guide, x, mutual_info=False)
    layer = report.layers["z"]
    assert not layer.conditional and layer.active.all() and layer.kl[0] < 0.01
    assert layer.collapsed.all() and "Not counted" not in report.verdict


def test_a_rotated_layer_that_lost_a_direction_is_named():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.7, 0.0], [0.0, 0.0, 0.0]]) @ Q.T  # rank 2

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ W, 0.5).to_event(1))

    x = torch.randn(400, 3, generator=g)
    report = collapse_report(model, guide, x, mutual_info=False)
    layer = report.layers["z"]
    assert layer.active.all() and layer.active_directions == 2
    assert "move along only 2 directions, though 3 of its axes are active" in report.verdict


def test_mixture_guides_get_per_dimension_marginal_kls():
    """A guide whose distribution does not factorise but has ``marginal_log_prob`` (the MoE
    mixture) gets per-dimension Monte-Carlo KLs of its 1-d marginals. With two components at
    +-m and unit scale, dimension d's marginal is 0.5 N(m_d, 1) + 0.5 N(-m_d, 1); its KL to
    N(0, 1) is computed here by quadrature. A dimension with m_d = 0 is exactly the prior."""
    from pvae.models.multimodal import StratifiedMixture

    m = torch.tensor([0.0, 1.0, 2.5])
    n = 200

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = torch.stack([m, -m]).expand(x.shape[0], 2, 3)
            valid = torch.ones(x.shape[0], 2, dtype=torch.bool)
            shift = torch.rand(x.shape[0])
            pyro.sample("z", StratifiedMixture(loc, torch.ones_like(loc), valid, shift))

    pyro.set_rng_seed(0)
    result = kl_per_dim(model, guide, torch.zeros(n, 1), num_particles=64)
    assert result.marginal and not result.analytic
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = []
    for md in m.double():
        q = 0.5 * (normal.log_prob(grid - md).exp() + normal.log_prob(grid + md).exp())
        expected.append(float(torch.trapezoid(q * (q.log() - normal.log_prob(grid)), grid)))
    # MC error: 200 x 64 draws; the log-ratio's sd is below 2.5 nats for m = 2.5.
    assert result.kl.tolist() == pytest.approx(expected, abs=0.05)
    assert abs(float(result.kl[0])) < 1e-6
    report = collapse_report(model, guide, torch.zeros(n, 1), mutual_info=False)
    assert report.layers["z"].collapsed.tolist() == [True, False, False]


def test_sequential_priors_get_chain_rule_terms_per_channel():
    """A factorised q over a (T, C) path against a prior with per-element conditional
    log-densities (an AR(1) prior per channel, p(z_t | z_{t-1}) = N(a z_{t-1}, 1)): the
    per-channel terms add up to KL(q || p), computed densely here (the AR(1) path is a
    Gaussian with a known covariance). Monte-Carlo tolerance: 200 datapoints x 64 draws."""
    from pyro.distributions import TorchDistribution

    T, a = 5, torch.tensor([0.0, 0.9])  # channel 0: i.i.d. N(0, 1); channel 1: AR(1)

    class AR1(TorchDistribution):
        arg_constraints: dict = {}
        support = dist.constraints.independent(dist.constraints.real, 2)

        def __init__(self, batch_shape=()):
            super().__init__(torch.Size(batch_shape), torch.Size([T, 2]), validate_args=False)

        def expand(self, batch_shape, _instance=None):
            return AR1(batch_shape)

        def log_prob_elements(self, z):
            previous = torch.cat([torch.zeros_like(z[..., :1, :]), z[..., :-1, :]], -2)
            return dist.Normal(a * previous, 1.0).log_prob(z)

        def log_prob(self, z):
            return self.log_prob_elements(z).sum((-2, -1))

    loc = torch.linspace(-1, 1, T * 2).reshape(T, 2)
    scale = torch.full((T, 2), 0.7)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", AR1())

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(2))

    pyro.set_rng_seed(0)
    result = kl_per_dim(model, guide, torch.zeros(200, 1), num_particles=64, channels={"z": -1})
    assert result.per_datapoint.shape == (200, 2)
    expected = []
    for c in range(2):
        steps = torch.arange(T)
        powers = a[c] ** (steps[:, None] - steps[None, :]).clamp(min=0).double()
        transition = torch.tril(powers)  # z = L e, e ~ N(0, I): cov = L L^T
        p = torch.distributions.MultivariateNormal(
            torch.zeros(T, dtype=torch.float64), scale_tril=transition
        )
        q = torch.distributions.MultivariateNormal(
            loc[:, c].double(), torch.diag(scale[:, c].double() ** 2)
        )
        expected.append(float(torch.distributions.kl_divergence(q, p)))
    assert result.kl.tolist() == pytest.approx(expected, abs=0.1)


def test_relevant_in_use_skips_collapsed_dimensions():
    """Scores 5, 3, 1, 0.5: without dimension 0 the shares are 3/4.5, 1/4.5, 0.5/4.5, so a
    90% threshold needs all three; with it, 5, 3, 1 reach 9/9.5 >= 0.9; all-zero scores: none."""
    from pvae.diagnostics import LatentRelevance, relevant_in_use

    scores = torch.tensor([5.0, 3.0, 1.0, 0.5])
    relevance = LatentRelevance(scores, [0, 1, 2, 3], scores, [0, 1, 2], 0.9, *[scores] * 3)
    assert relevant_in_use(relevance, collapsed=[0]) == [1, 2, 3]
    assert relevant_in_use(relevance, collapsed=[]) == [0, 1, 2]
    assert relevant_in_use(relevance, collapsed=[0, 1, 2, 3]) == []
    relevance.scores = torch.zeros(4)
    assert relevant_in_use(relevance, collapsed=[]) == []
