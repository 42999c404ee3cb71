"""BayesianAE: sites and densities, posterior summaries, generation and prior selection."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

import pvae
from pvae.inference import SGHMC
from pvae.models import BayesianAE
from pvae.protocol import DATA_PLATE


def _binary(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def test_weights_are_global_sites_and_x_is_scored_in_the_data_plate():
    bae = BayesianAE(x_dim=6, z_dim=2, hidden=(4,))
    x = _binary(5, 6)
    trace = pyro.poutine.trace(pvae.scale_to_data(bae.model, 50)).get_trace(x)
    trace.compute_log_prob()
    weights = [name for pair in bae.site_names for name in pair]
    assert bae.layer_names == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    assert weights[0] == f"{bae._pyro_name}.encoder.0.weight"
    shapes = [tuple(trace.nodes[name]["value"].shape) for name in weights]
    assert shapes == [(4, 6), (4,), (2, 4), (2,), (4, 2), (4,), (6, 4), (6,)]
    for name in weights:  # read once, outside the plate: counted once (scale 1)
        site = trace.nodes[name]
        assert not site["is_observed"] and site["scale"] == 1.0
        assert all(frame.name != DATA_PLATE for frame in site["cond_indep_stack"])
    site = trace.nodes["x"]
    assert site["is_observed"] and site["scale"] == pytest.approx(10.0)  # N / B = 50 / 5
    assert [frame.name for frame in site["cond_indep_stack"]] == [DATA_PLATE]


def test_log_joint_is_the_prior_plus_the_likelihood_of_the_reconstruction():
    torch.manual_seed(0)
    bae = BayesianAE(x_dim=5, z_dim=2, hidden=(3,), prior_scale={"decoder.1": 0.5})
    x = _binary(4, 5, seed=1)
    trace = pyro.poutine.trace(bae.model).get_trace(x)
    values = [trace.nodes[name]["value"] for pair in bae.site_names for name in pair]
    scales = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    log_prior = sum(
        dist.Normal(0.0, s).log_prob(v).sum() for v, s in zip(values, scales, strict=True)
    )
    (w1, b1, w2, b2, w3, b3, w4, b4) = values
    logits = F.linear(
        F.relu(F.linear(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), w3, b3)), w4, b4
    )
    log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    assert float(trace.log_prob_sum()) == pytest.approx(float(log_prior + log_lik), rel=1e-5)


def _two_draw_posterior(bae: BayesianAE, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    draws = {}
    for (weight, bias), layer in zip(bae.site_names, bae.layers.values(), strict=True):
        draws[weight] = torch.randn(2, layer.out_features, layer.in_features, generator=generator)
        draws[bias] = torch.randn(2, layer.out_features, generator=generator)
    return draws


def test_reconstruct_and_log_likelihood_average_over_draws():
    bae = BayesianAE(x_dim=5, z_dim=2, hidden=(3,))
    posterior = _two_draw_posterior(bae)
    x = _binary(4, 5, seed=2)
    probs, log_liks = [], []
    for s in range(2):
        with pyro.poutine.trace() as tracer:
            pyro.poutine.condition(bae.model, {k: v[s] for k, v in posterior.items()})(x)
        site = tracer.trace.nodes["x"]
        probs.append(site["fn"].base_dist.mean if hasattr(site["fn"], "base_dist") else None)
        log_liks.append(site["fn"].log_prob(x))
    mean, sd = bae.reconstruct(posterior, x)
    expected = torch.stack([p for p in probs if p is not None])
    assert torch.allclose(mean, expected.mean(0), atol=1e-6)
    assert torch.allclose(sd, (expected[0] - expected[1]).abs() / 2, atol=1e-6)
    ll = bae.log_likelihood(posterior, x)
    assert torch.allclose(ll, torch.logsumexp(torch.stack(log_liks), 0) - math.log(2), atol=1e-5)
    codes_mean, codes_sd = bae.encode(posterior, x)
    assert codes_mean.shape == codes_sd.shape == (4, 2)


def test_sghmc_sampling_and_generation_end_to_end():
    torch.manual_seed(0)
    x = torch.cat([_binary(20, 8, seed=3) * 0, torch.ones(20, 8)])  # two clusters
    bae = BayesianAE(x_dim=8, z_dim=2, hidden=(6,))
    posterior = pvae.sample(
        bae.model,
        x,
        SGHMC(lr=0.02),
        num_samples=20,
        warmup=100,
        batch_size=40,
        seed=0,
        progress=False,
    )
    mean, sd = bae.reconstruct(posterior, x, num_samples=10)
    assert mean.shape == sd.shape == (40, 8)
    assert (sd >= 0).all() and (mean >= 0).all() and (mean <= 1).all()
    # the reconstructions learn the two clusters: better than the prior's, on average
    assert float(bae.log_likelihood(posterior, x).mean()) > -8 * math.log(2)
    mixture = bae.fit_latent_mixture(posterior, x, num_samples=5, max_components=4, seed=0)
    assert mixture.weights_.shape == (4,)
    generated = bae.generate(16, seed=0)
    assert generated.shape == (16, 8) and torch.isfinite(generated).all()
    assert torch.equal(generated, bae.generate(16, seed=0))


def test_latent_mixture_of_one_chain_uses_that_chain_s_draws():
    # the docstring's recipe: {site: t[c]} (chain c's (draws, *shape)) from (chains, draws, ...)
    bae = BayesianAE(x_dim=5, z_dim=2, hidden=(3,))
    chain0, chain1 = _two_draw_posterior(bae, seed=0), _two_draw_posterior(bae, seed=1)
    samples = {k: torch.stack([chain0[k], chain1[k]]) for k in chain0}  # (2 chains, 2 draws)
    x = _binary(12, 5, seed=4)
    bae.fit_latent_mixture({k: t[1] for k, t in samples.items()}, x, max_components=2)
    decoders = [name for name, _ in bae.site_names[len(bae.encoder) :]]
    for s, weights in enumerate(bae._mixture_weights):
        for (weight, _), name in zip(weights, decoders, strict=True):
            assert torch.equal(weight, chain1[name][s])
    assert bae.generate(4, seed=0).shape == (4, 5)


def test_prior_selection_recovers_the_scale_that_generated_the_data():
    # Data from a linear decoder with weight and bias scale s_true = 2:
    #     x = W h + b,  h in {-1, +1}^k,  W, b ~ N(0, s_true^2).
    # A BayesianAE with tanh activations and large scales on the layers before the last
    # saturates its hidden units to +-1, so its last layer sees codes like h and its
    # prior-predictive outputs have the data's law when the last layer's scale is s_true.
    torch.manual_seed(0)
    d, k, s_true, n = 20, 6, 2.0, 300
    generator = torch.Generator().manual_seed(1)
    w, b = torch.randn(d, k, generator=generator) * s_true, torch.randn(d, generator=generator)
    h = torch.randint(0, 2, (n, k), generator=generator).float() * 2 - 1
    x = h @ w.T + b * s_true
    bae = BayesianAE(
        x_dim=d,
        z_dim=k,
        hidden=(k,),
        likelihood="gaussian",
        activation=torch.nn.Tanh,
        prior_scale=10.0,
    )
    candidates = [{"decoder.1": s} for s in (0.5, 1.0, 2.0, 4.0, 8.0)]
    for metric in ("sw", "dswd"):
        choice = bae.select_prior(x, candidates, metric=metric, num_draws=20, apply=False)
        assert choice.best == {"decoder.1": s_true}, (metric, choice.distances)
    bae.select_prior(x, candidates, metric="sw", num_draws=20)
    assert bae.prior_scale["decoder.1"] == s_true and bae.prior_scale["encoder.0"] == 10.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="would learn a parameter"):
        BayesianAE(x_dim=4, z_dim=2, likelihood="gaussian", likelihood_kw={"scale": None})
    with pytest.raises(ValueError, match="unknown layers"):
        BayesianAE(x_dim=4, z_dim=2, prior_scale={"decoder.7": 1.0})
    with pytest.raises(ValueError, match="prior_scale must be positive"):
        BayesianAE(x_dim=4, z_dim=2, prior_scale=-1.0)
    with pytest.raises(ValueError, match="z_dim"):
        BayesianAE(x_dim=4, z_dim=0)
    bae = BayesianAE(x_dim=4, z_dim=2, hidden=())
    with pytest.raises(ValueError, match="shape"):
        bae.model(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="sampled, not trained"):
        bae.guide(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="lacks the sites"):
        bae.reconstruct({"other.weight": torch.zeros(2, 3)}, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="metric"):
        bae.select_prior(torch.zeros(3, 4), metric="kl")
    with pytest.raises(ValueError, match="fit_latent_mixture"):
        bae.generate(3)
