"""MM-GPVAE: the Fourier prior against the dense RBF GP, the Poisson closed form against Monte
Carlo, missing modalities, both priors with the engines, and identification after training."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from pvae import data
from pvae.diagnostics import identification_r2
from pvae.inference import ELBO, IWAE
from pvae.models import MultimodalGPVAE
from pvae.models.multimodal_gp import (
    FourierRBFPrior,
    MarkovianPrior,
    TemporalPrior,
    fourier_basis,
    poisson_expected_log_likelihood,
)


def _batch(seed=0, n=4, steps=30, neurons=6):
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(2 * torch.ones(n, steps, neurons), generator=g)
    frames = torch.rand(n, steps, 1, 8, 8, generator=g)
    times = torch.arange(steps, dtype=torch.float32).expand(n, steps) * 0.5
    mask = torch.tensor([[True, True], [True, False], [False, True], [True, True]])[:n]
    return counts, frames, times, mask


# -- the Fourier prior ------------------------------------------------------------------------
def test_fourier_basis_is_orthonormal_on_the_padded_grid():
    for padded in (16, 17):
        basis, index = fourier_basis(padded, padded, padded // 2, dtype=torch.float64)
        assert basis.shape == (padded, padded)
        torch.testing.assert_close(basis.T @ basis, torch.eye(padded, dtype=torch.float64))
        assert index.max() == padded // 2


@pytest.mark.parametrize(
    ("lengthscale", "dt", "steps"), [(3.0, 1.0, 50), (5.0, 1.0, 40), (2.0, 0.25, 60)]
)
def test_fourier_prior_covariance_matches_the_dense_rbf_kernel(lengthscale, dt, steps):
    prior = FourierRBFPrior(2, lengthscale=lengthscale).double()
    basis, variance = prior.basis(steps, dt)
    assert basis.shape[1] < prior.padded_steps(steps, dt)  # truncated: K < T'
    covariance = basis @ torch.diag(variance[0]) @ basis.T
    t = torch.arange(steps, dtype=torch.float64) * dt
    kernel = torch.exp(-((t[:, None] - t) ** 2) / (2 * lengthscale**2))
    # periodic wrap-around at >= 4 lengthscales: error <= exp(-16 / 2) = 3.4e-4 (truncation
    # at S(w) / S(0) = 1e-8 adds less)
    assert (covariance - kernel).abs().max() < math.exp(-8)
    # a shorter padding leaves the wrap-around error the bound predicts
    short = FourierRBFPrior(1, lengthscale=lengthscale, padding=lengthscale).double()
    basis, variance = short.basis(steps, dt)
    error = (basis @ torch.diag(variance[0]) @ basis.T - kernel).abs().max()
    assert error > 0.1 * math.exp(-0.5)


def test_fourier_prior_paths_have_the_rbf_covariance():
    torch.manual_seed(0)
    prior = FourierRBFPrior(1, lengthscale=4.0).double()
    value = prior.prior(20000, 25, 1.0).sample()
    paths = prior.paths(value, 25, 1.0)[..., 0]  # (20000, 25)
    t = torch.arange(25, dtype=torch.float64)
    kernel = torch.exp(-((t[:, None] - t) ** 2) / 32.0)
    # 20,000 draws: sd of a covariance entry <= sqrt(2 / 20000) = 0.01; tolerance 5 sd
    assert (paths.T.cov() - kernel).abs().max() < 0.05


def test_posterior_is_the_exact_gaussian_update():
    """With potentials at every step the coefficient posterior equals the dense Gaussian
    conditional of the paths' prior given N(loc_t | z_t, 1 / precision_t)."""
    prior = FourierRBFPrior(1, lengthscale=3.0).double()
    g = torch.Generator().manual_seed(0)
    steps = 20
    loc = torch.randn(1, steps, 1, generator=g, dtype=torch.float64)
    precision = torch.rand(1, steps, 1, generator=g, dtype=torch.float64) + 0.5
    q = prior.posterior(loc, precision, 1.0)
    mean, variance = prior.path_moments(q, steps, 1.0)
    basis, lam = prior.basis(steps, 1.0)
    K = basis @ torch.diag(lam[0]) @ basis.T
    noise = torch.diag(precision[0, :, 0].reciprocal())
    gain = K @ torch.linalg.inv(K + noise)
    torch.testing.assert_close(mean[0, :, 0], gain @ loc[0, :, 0])
    torch.testing.assert_close(variance[0, :, 0], torch.diagonal(K - gain @ K))


# -- the Poisson closed form ------------------------------------------------------------------
def test_poisson_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    counts = torch.tensor([0.0, 1.0, 4.0, 9.0])
    mean = torch.tensor([-1.0, 0.2, 1.3, 2.0], dtype=torch.float64)
    variance = torch.tensor([0.5, 0.1, 0.3, 0.05], dtype=torch.float64)
    eta = mean + variance.sqrt() * torch.randn(200000, 4, dtype=torch.float64)
    draws = torch.distributions.Poisson(eta.exp()).log_prob(counts)
    closed = poisson_expected_log_likelihood(counts, mean, variance)
    # 200,000 draws: 5 standard errors
    torch.testing.assert_close(
        closed, draws.mean(0), atol=5 * float(draws.std(0).max()) / 447, rtol=0
    )


@pytest.mark.parametrize("prior", ["fourier", "markovian"])
def test_model_expected_log_likelihood_matches_monte_carlo_of_the_site(prior):
    torch.manual_seed(0)
    model = MultimodalGPVAE(6, hidden=(16,), prior=prior, lengthscale=3.0, name="mm_mc")
    counts, frames, times, mask = _batch()
    closed = model.expected_log_likelihood(counts, frames, times, mask)
    draws = []
    with torch.no_grad():
        for _ in range(40):
            guide = poutine.trace(model.guide).get_trace(counts, frames, times, mask)
            with pyro.plate("particles", 50, dim=-2):
                model_trace = poutine.trace(
                    poutine.replay(model.model, trace=_expand(guide, 50))
                ).get_trace(counts, frames, times, mask)
            site = model_trace.nodes["neural"]
            draws.append(site["fn"].log_prob(site["value"]))
    draws = torch.cat(draws)  # (2000, B)
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    assert closed[~mask[:, 0]].abs().max() == 0
    assert torch.all((closed - draws.mean(0)).abs() <= 5 * standard_error + 1e-3)


def _expand(trace, particles):
    """The guide's trace with ``particles`` draws of ``z`` per trial (a particle dim in front)."""
    site = trace.nodes["z"]
    site["value"] = site["fn"].sample(torch.Size([particles]))
    return trace


def test_analytic_poisson_gives_the_same_elbo_in_expectation():
    pyro.set_rng_seed(0)
    counts, frames, times, mask = _batch()
    mc = MultimodalGPVAE(6, hidden=(16,), lengthscale=3.0, name="mm_a")
    analytic = MultimodalGPVAE(6, hidden=(16,), lengthscale=3.0, analytic_poisson=True, name="mm_b")
    analytic.load_state_dict(mc.state_dict())
    elbo = ELBO(num_particles=400)
    a = elbo.loss(mc.model, mc.guide, counts, frames, times, mask)
    b = elbo.loss(analytic.model, analytic.guide, counts, frames, times, mask)
    assert b == pytest.approx(a, rel=2e-3)
    # the closed form removes the Monte-Carlo noise of the neural term
    one = ELBO()
    spread_mc = torch.tensor(
        [one.loss(mc.model, mc.guide, counts, frames, times, mask) for _ in range(20)]
    )
    spread_an = torch.tensor(
        [one.loss(analytic.model, analytic.guide, counts, frames, times, mask) for _ in range(20)]
    )
    assert spread_an.std() < spread_mc.std()


# -- missing modalities -----------------------------------------------------------------------
def test_missing_modalities_give_no_potential_and_no_likelihood():
    pyro.set_rng_seed(0)
    model = MultimodalGPVAE(6, hidden=(16,), lengthscale=3.0, name="mm_missing").double()
    counts, frames, times, mask = (x.double() if x.is_floating_point() else x for x in _batch())
    q = model.posterior(counts, frames, times, mask).base_dist
    prior = model.prior_process.prior(4, 30, 0.5).base_dist
    image_private, neural_private = model.groups["image"].start, model.groups["neural"].start
    # trial 1 has no image: its image-private channel keeps the prior; trial 2 no counts
    torch.testing.assert_close(q.loc[1, image_private], torch.zeros_like(q.loc[1, 0]))
    torch.testing.assert_close(q.covariance_matrix[1, image_private], prior.covariance_matrix[1, 0])
    torch.testing.assert_close(
        q.covariance_matrix[2, neural_private], prior.covariance_matrix[2, 0]
    )
    assert not torch.allclose(q.covariance_matrix[0, image_private], prior.covariance_matrix[0, 0])
    # the values of a missing modality do not matter
    garbage_counts, garbage_frames = counts.clone(), frames.clone()
    garbage_counts[2] = 7.0
    garbage_frames[1] = 0.123
    guide = poutine.trace(model.guide).get_trace(counts, frames, times, mask)
    replayed = poutine.trace(poutine.replay(model.model, trace=guide))
    clean = replayed.get_trace(counts, frames, times, mask)
    guide_2 = poutine.trace(model.guide).get_trace(garbage_counts, garbage_frames, times, mask)
    torch.testing.assert_close(
        guide_2.nodes["z"]["fn"].base_dist.loc, guide.nodes["z"]["fn"].base_dist.loc
    )
    dirty = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(
        garbage_counts, garbage_frames, times, mask
    )
    clean.compute_log_prob()
    dirty.compute_log_prob()
    for site in ("neural", "image", "z"):
        torch.testing.assert_close(clean.nodes[site]["log_prob"], dirty.nodes[site]["log_prob"])
    assert clean.nodes["neural"]["log_prob"][2] == 0 and clean.nodes["image"]["log_prob"][1] == 0


# -- priors, engines, checks ------------------------------------------------------------------
@pytest.mark.parametrize("prior", ["fourier", "markovian"])
@pytest.mark.parametrize("engine", [ELBO(), IWAE(num_particles=3)])
def test_trains_with_the_engines(prior, engine):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = MultimodalGPVAE(6, hidden=(16,), prior=prior, lengthscale=3.0, name="mm_engine")
    assert isinstance(model.prior_process, FourierRBFPrior | MarkovianPrior)
    assert isinstance(model.prior_process, TemporalPrior)
    batch = _batch()
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), loss=engine)
    losses = [svi.step(*batch) for _ in range(15)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    before = model.prior_process.log_lengthscale.detach().clone()
    svi.step(*batch)
    assert not torch.equal(before, model.prior_process.log_lengthscale)  # learned
    z, rates, images = model.sample(12, num_samples=2)
    assert z.shape == (2, 12, 3) and rates.shape == (2, 12, 6) and images.shape == (2, 12, 1, 8, 8)


def test_bad_input():
    model = MultimodalGPVAE(6, hidden=(16,), name="mm_bad")
    counts, frames, times, mask = _batch()
    with pytest.raises(ValueError, match="num_neurons"):
        model.model(counts[..., :5], frames, times, mask)
    with pytest.raises(ValueError, match="frames"):
        model.model(counts, frames[:, :3], times, mask)
    with pytest.raises(ValueError, match="evenly spaced"):
        model.model(counts, frames, times.pow(2), mask)
    with pytest.raises(TypeError, match="modality_mask"):
        model.model(counts, frames, times, mask.float())
    with pytest.raises(ValueError, match="modality_mask"):
        model.model(counts, frames, times, mask[:, :1])
    with pytest.raises(ValueError, match="prior"):
        MultimodalGPVAE(6, prior="dense")
    with pytest.raises(ValueError, match="channels"):
        MultimodalGPVAE(6, prior=FourierRBFPrior(2))
    with pytest.raises(ValueError, match="shared_dim"):
        MultimodalGPVAE(6, shared_dim=0)


def _site_log_probs(model, value, batch):
    """log p of the "neural" and "image" sites at the latent draw ``value``, ``(B,)`` each."""
    conditioned = poutine.condition(model.model, data={"z": value})
    trace = poutine.trace(conditioned).get_trace(*batch)
    return {
        name: trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"])
        for name in ("neural", "image")
    }


def test_private_off_cuts_exactly_the_private_channels_of_the_named_decoders():
    torch.manual_seed(0)
    model = MultimodalGPVAE(6, hidden=(16,), name="mm_private_off")
    batch = _batch()
    value = model.posterior(*batch).sample()  # (B, C, K): one row of coefficients per channel
    moved = value.clone()  # the same draw with both private channels' paths changed
    moved[:, model.groups["neural"]] += 1.0
    moved[:, model.groups["image"]] += 1.0

    both = batch[3].all(-1)  # trials with both modalities (a missing one scores 0)

    def change():
        base, other = _site_log_probs(model, value, batch), _site_log_probs(model, moved, batch)
        return {site: (other[site] - base[site])[both].abs().min() for site in base}

    assert min(change().values()) > 1e-3  # each decoder reads its private channel
    with model.private_off("image"):
        cut = change()
    assert cut["image"] == 0 and cut["neural"] > 1e-3
    with model.private_off("neural", "image"):
        assert max(change().values()) == 0
    # the closed-form Poisson term follows the cut: equal to zeroing the private loadings
    with model.private_off("neural"):
        cut = model.expected_log_likelihood(*batch)
    with torch.no_grad():
        model.neural_decoder.weight[:, model.groups["neural"]] = 0.0
    torch.testing.assert_close(cut, model.expected_log_likelihood(*batch))
    # left on exit, also after an error; a bad name refused
    with pytest.raises(RuntimeError), model.private_off("image"):
        raise RuntimeError
    assert model._muted == frozenset()
    with pytest.raises(ValueError, match="modalities"):
        with model.private_off("images"):
            pass


# -- identification after training ------------------------------------------------------------
def test_image_likelihood_keywords_and_its_learned_scale_trains():
    counts, frames, times, mask = _batch()
    fixed = MultimodalGPVAE(
        6, image_likelihood="gaussian", image_likelihood_kw={"scale": 0.5}, name="mm_fixed"
    )
    assert float(fixed.image_likelihood.scale) == 0.5
    with pytest.raises(TypeError, match="image_likelihood_kw"):
        MultimodalGPVAE(6, image_likelihood="gaussian", image_likelihood_kw=[("scale", 1.0)])
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    learned = MultimodalGPVAE(6, image_likelihood="gaussian", name="mm_learned")
    svi = pyro.infer.SVI(
        learned.model, learned.guide, pyro.optim.Adam({"lr": 0.1}), loss=pyro.infer.Trace_ELBO()
    )
    svi.step(counts, frames, times, mask)
    # the Gaussian's log-scale is a decoder parameter: registered, and moved by one Adam step
    assert "mm_learned.image_likelihood$$$log_scale" in pyro.get_param_store().keys()
    assert float(learned.image_likelihood.log_scale.detach().abs().min()) > 0.05


@pytest.mark.slow
def test_training_on_mm_gp_sim_identifies_every_latent_group():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ds = data.load("mm-gp-sim", sizes=(200, 0, 100), seed=0)
    model = MultimodalGPVAE(
        ds.num_neurons,
        hidden=(128,),
        lengthscale=5.0,
        image_likelihood="gaussian",
        image_likelihood_kw={"scale": 1.0},
        name="mm_identify",
    )
    svi = pyro.infer.SVI(
        model.model, model.guide, pyro.optim.Adam({"lr": 5e-3}), loss=pyro.infer.Trace_ELBO()
    )
    counts, frames, times, mask = ds.train
    # measured with this seed: shared 0.99, neural 0.93, image 0.97, cross-group < 0.04; with
    # the continuous Bernoulli instead, image 0.46 after 450 steps and 0.44 after 900
    for _ in range(450):
        index = torch.randint(0, 200, (50,))
        svi.step(counts[index], frames[index], times[index], mask[index])
    inferred = model.latents(*ds.test)
    true = {group: ds.truth["test"][group] for group in ("shared", "neural", "image")}
    result = identification_r2(inferred, true)
    for group in ("shared", "neural", "image"):
        assert result.diagonal[group] >= 0.9, result.table()
    assert result.off_diagonal_max() < 0.1, result.table()
