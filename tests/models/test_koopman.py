"""KoopmanVAE: the least-squares Koopman fit, the spline, the sequential prior, the penalty
factor, masks, training with ELBO and IWAE, spectral constraints, and the truth tests."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy.interpolate import CubicSpline

import pvae
from pvae.inference import ELBO, IWAE
from pvae.models import KoopmanVAE
from pvae.models.koopman import (
    koopman_operator,
    natural_cubic_spline,
    operator_penalty,
    predictive_loss,
    spectral_penalty,
)


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _planted(k=4, n=16, steps=10, dtype=torch.float64):
    torch.manual_seed(0)
    A = torch.randn(k, k, dtype=dtype)
    A = 0.95 * A / torch.linalg.matrix_norm(A, ord=2)
    z = [torch.randn(n, k, dtype=dtype)]
    for _ in range(steps - 1):
        z.append(z[-1] @ A)
    return A, torch.stack(z, 1)


@pytest.mark.parametrize("solver", ["qr", "pinv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_least_squares_recovers_a_planted_operator(solver, dtype):
    A, z = _planted(dtype=dtype)
    torch.testing.assert_close(koopman_operator(z, solver), A, atol=1e-5, rtol=0)
    assert float(predictive_loss(z, A, horizon=3)) < 1e-10


def test_least_squares_is_differentiable():
    A, z = _planted()
    z = z.clone().requires_grad_()
    koopman_operator(z).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_spline_is_the_natural_cubic_spline_of_the_observed_rows():
    torch.manual_seed(1)
    times = torch.sort(torch.rand(4, 15, dtype=torch.float64) * 10, 1).values
    values = torch.stack([times.sin(), times.cos()], -1)
    mask = torch.rand(4, 15) > 0.4
    mask[:, 2] = mask[:, 9] = True
    mask[3] = False
    mask[3, 4] = True  # one observed row: constant
    out = natural_cubic_spline(times, values, mask)
    for b in range(3):
        rows = mask[b]
        first, last = times[b][rows][0], times[b][rows][-1]
        inside = (times[b] >= first) & (times[b] <= last)
        for c in range(2):
            spline = CubicSpline(
                times[b][rows].numpy(), values[b, rows, c].numpy(), bc_type="natural"
            )
            expected = torch.as_tensor(spline(times[b][inside].numpy()))
            torch.testing.assert_close(out[b, inside, c], expected, atol=1e-10, rtol=0)
        assert torch.equal(out[b, rows], values[b, rows])
        assert (out[b, times[b] < first] == values[b, rows][0]).all()
        assert (out[b, times[b] > last] == values[b, rows][-1]).all()
    assert (out[3] == values[3, 4]).all()


def test_spectral_penalties():
    inside = torch.tensor([0.5 + 0.5j, 0.5 - 0.5j])
    outside = torch.tensor([1.2 + 0j, 0.3 + 0j])
    assert float(spectral_penalty(inside, "stable")) == 0
    assert float(spectral_penalty(outside, "stable")) == pytest.approx(0.04, abs=1e-6)
    assert float(spectral_penalty(torch.tensor([1j, -1j]), "unit")) == pytest.approx(0, abs=1e-12)
    assert float(spectral_penalty(outside, "unit")) == pytest.approx(0.04 + 0.49, abs=1e-6)
    assert float(spectral_penalty(inside, torch.tensor([0.5 + 0.5j]))) == 0
    with pytest.raises(ValueError, match="constraint"):
        spectral_penalty(inside, "round")


def _data(n=8, missing=0.0):
    return pvae.data.load("sines", sizes=(n, 2, 2), missing=missing).train


def _prior_by_hand(kvae, z, later_scale=None):
    """sum_t log N(z_t | mu(h_t), s_t) of the GRU prior, h_t the GRU cell over z_<t and s_t
    sigma(h_t) (``later_scale`` after the first step when given), one step at a time."""
    net = kvae.prior_net
    hidden = torch.zeros(1, z.shape[0], net.gru.hidden_size)
    previous = torch.zeros(z.shape[0], 1, z.shape[-1])
    expected = torch.zeros(z.shape[0])
    for t in range(z.shape[1]):
        out, hidden = net.gru(previous, hidden)
        loc, raw = net.head(out[:, 0]).chunk(2, -1)
        scale = torch.nn.functional.softplus(raw) + 1e-4
        if later_scale is not None and t > 0:
            scale = torch.tensor(later_scale)
        expected += torch.distributions.Normal(loc, scale).log_prob(z[:, t]).sum(-1)
        previous = z[:, t : t + 1]
    return expected


def test_model_scores_the_guides_path_with_the_prior_on_its_past():
    """The site 'z' replayed on the guide is sum_t log N(z_t | mu(h_t), sigma(h_t)) with h_t a
    GRU over the guide's own z_<t: checked step by step against the GRU cell."""
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6).eval()
    values, times, mask = _data(4)
    guide = poutine.trace(kvae.guide).get_trace(values, times, mask)
    model = poutine.trace(poutine.replay(kvae.model, trace=guide)).get_trace(values, times, mask)
    z = guide.nodes["z"]["value"]
    expected = _prior_by_hand(kvae, z)
    got = model.nodes["z"]["fn"].log_prob(z)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "koopman_penalty" not in model.nodes  # eval mode: no rollouts


def test_penalty_factor_is_zero_valued_with_the_penaltys_gradient():
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6, constraint="unit", spectral_weight=2.0)
    values, times, mask = _data(4)
    trace = poutine.trace(kvae.model).get_trace(values, times, mask)
    site = trace.nodes["koopman_penalty"]
    log_factor = site["fn"].log_prob(site["value"])
    assert log_factor.shape == (4,) and (log_factor == 0).all()
    log_factor.sum().backward()
    grads = [p.grad for p in kvae.prior_net.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert set(kvae.penalties) == {"predictive", "spectral"}


def test_reported_bound_is_the_same_with_and_without_the_penalty():
    values, times, mask = _data(6)
    bounds = []
    for training in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        kvae = KoopmanVAE(5, z_dim=3, hidden=6, name="kvae_bound").train(training)
        engine = ELBO()
        torch.manual_seed(1)
        guide = poutine.trace(kvae.guide).get_trace(values, times, mask)
        replayed = poutine.replay(kvae.guide, trace=guide)
        _, bound = engine.objective(kvae.model, replayed, (values, times, mask), {})
        bounds.append(float(bound))
    assert bounds[0] == pytest.approx(bounds[1], rel=1e-6)


def test_hidden_rows_are_not_scored():
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6).eval()
    values, times, mask = _data(4, missing=0.5)
    z = torch.randn(4, 24, 3)
    changed = values.clone()
    changed[~mask] = 7.0
    scores = []
    for x in (values, changed):
        conditioned = poutine.condition(kvae.model, data={"z": z})
        trace = poutine.trace(conditioned).get_trace(x, times, mask)
        scores.append(trace.nodes["x"]["fn"].log_prob(x))
    torch.testing.assert_close(scores[0], scores[1])


@pytest.mark.parametrize("engine", [ELBO(), IWAE(num_particles=3)], ids=["elbo", "iwae"])
@pytest.mark.parametrize("missing", [0.0, 0.5])
def test_trains_with_elbo_and_iwae(engine, missing):
    ds = pvae.data.load("sines", sizes=(32, 8, 8), missing=missing)
    kvae = KoopmanVAE(5, z_dim=3, hidden=8)
    run = pvae.fit(
        kvae.model, kvae.guide, ds.train, engine=engine, epochs=3, batch_size=16, seed=0, lr=1e-2
    )
    assert all(math.isfinite(h["train_bound"]) for h in run.history)
    ll = pvae.log_likelihood(kvae.model, kvae.guide, ds.test, num_samples=4)
    assert ll.shape == (8,) and torch.isfinite(ll).all()
    assert kvae.sample(24, 5).shape == (5, 24, 5)


@pytest.mark.parametrize("constraint", ["unit", "stable"])
def test_eigenvalue_constraint_holds_after_training(constraint):
    """Unconstrained, the tiny model's fitted operator on sines has eigenvalues far inside the
    unit circle after 40 steps (|lambda| < 0.3); with modulus one imposed they end within 0.1
    of the circle, and with the bound |lambda| <= 0.5 within 0.05 of it."""
    ds = pvae.data.load("sines", sizes=(64, 8, 8))
    moduli = {}
    # the unconstrained run (weight 0) is the control of the "unit" case only
    for weight in (0.0, 200.0) if constraint == "unit" else (200.0,):
        pyro.clear_param_store()
        torch.manual_seed(0)
        kvae = KoopmanVAE(
            5, z_dim=2, hidden=8, constraint=constraint, max_modulus=0.5, spectral_weight=weight
        )
        pvae.fit(
            kvae.model,
            kvae.guide,
            ds.train,
            engine=ELBO(),
            epochs=20,
            batch_size=32,
            seed=0,
            lr=1e-2,
        )
        torch.manual_seed(0)
        moduli[weight] = kvae.eigenvalues(num_paths=256).abs()
    if constraint == "unit":
        assert (moduli[0.0] - 1).abs().max() > 0.7
        assert (moduli[200.0] - 1).abs().max() < 0.1
    else:
        assert moduli[200.0].max() < 0.55


def test_prescribed_eigenvalue_penalty_vanishes_at_them():
    target = 0.9 * torch.exp(torch.tensor([0.4j, -0.4j]))
    rotation = 0.9 * torch.tensor([[math.cos(0.4), math.sin(0.4)], [-math.sin(0.4), math.cos(0.4)]])
    assert float(operator_penalty(rotation, target)) < 1e-10
    assert float(operator_penalty(0.9 * torch.eye(2), target)) > 0.1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="z_dim"):
        KoopmanVAE(5, z_dim=0)
    with pytest.raises(ValueError, match="constraint"):
        KoopmanVAE(5, constraint="round")
    with pytest.raises(ValueError, match="constraint"):
        KoopmanVAE(5, z_dim=2, constraint=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="solver"):
        KoopmanVAE(5, solver="svd")
    kvae = KoopmanVAE(5, z_dim=2, hidden=4)
    with pytest.raises(ValueError, match="values"):
        kvae.model(torch.zeros(2, 24, 4))
    with pytest.raises(ValueError, match="mask"):
        kvae.model(torch.zeros(2, 24, 5), None, torch.ones(2, 24))
    with pytest.raises(ValueError, match="at least"):
        koopman_operator(torch.zeros(1, 2, 4))


@pytest.mark.slow
def test_learned_eigenvalues_approach_the_oscillators():
    """Damped linear oscillator, true eigenvalues exp(0.25 (-0.075 +- 1.498i)) = 0.913 +- 0.359i:
    after 100 steps the learned pair lies within 0.06 of them (at initialisation: > 0.3)."""
    ds = pvae.data.load("oscillators", sizes=(500, 10, 10))
    true = pvae.data.true_eigenvalues(ds)
    torch.manual_seed(0)
    kvae = KoopmanVAE(2, z_dim=2, hidden=32, likelihood="gaussian", likelihood_kw={"scale": 0.05})

    def distance():
        torch.manual_seed(0)
        eig = kvae.eigenvalues()
        return float((eig[:, None] - true[None, :]).abs().min(0).values.max())

    before = distance()
    pvae.fit(
        kvae.model, kvae.guide, ds.train, engine=ELBO(), epochs=10, batch_size=50, seed=0, lr=3e-3
    )
    assert distance() < 0.06 < 0.3 < before


def test_impute_keeps_observed_rows():
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6).eval()
    values, times, mask = _data(4, missing=0.5)
    filled = kvae.impute(values, mask, times)
    assert filled.shape == values.shape
    assert torch.equal(filled[mask], values[mask])
    assert not torch.equal(filled[~mask], values[~mask])


def test_spectral_penalty_waits_for_its_warmup():
    """The spectral term is absent from the first ``spectral_warmup`` training calls (the
    penalty's gradient then reaches the prior only through the predictive loss) and present
    after them."""
    values, times, mask = _data(4)
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6, constraint="unit", spectral_warmup=2)
    for call in range(4):
        kvae.penalties.clear()
        poutine.trace(kvae.model).get_trace(values, times, mask)
        assert ("spectral" in kvae.penalties) == (call >= 2), call
    assert kvae.penalty_steps == 4
    kvae.eval()
    poutine.trace(kvae.model).get_trace(values, times, mask)
    assert kvae.penalty_steps == 4  # eval mode adds no penalty and counts nothing


def test_posterior_term_is_the_predictive_loss_of_the_guides_path_under_the_rollouts_A():
    """With posterior_weight beta, the penalty is alpha L_pred(rollouts, A) + beta
    L_pred(z, A), A fitted on the same rollouts: recomputed here from the same random draws."""
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6, predictive_weight=2.0, posterior_weight=3.0)
    z = torch.randn(4, 24, 3)
    torch.manual_seed(5)
    got = kvae.penalty(4, 24, z)
    torch.manual_seed(5)
    paths = kvae.prior_net.rollout(4, 24)
    A = koopman_operator(paths)
    expected = 2.0 * predictive_loss(paths, A) + 3.0 * predictive_loss(z, A)
    torch.testing.assert_close(got, expected)
    assert kvae.penalties["posterior"] == pytest.approx(float(predictive_loss(z, A)), rel=1e-6)
    # Replayed on the guide, the model scores the guide's path: the factor's gradient reaches
    # the encoder only through the posterior term.
    values, times, mask = _data(4)
    guide = poutine.trace(kvae.guide).get_trace(values, times, mask)
    model = poutine.trace(poutine.replay(kvae.model, trace=guide)).get_trace(values, times, mask)
    site = model.nodes["koopman_penalty"]
    site["fn"].log_prob(site["value"]).sum().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in kvae.encoder_head.parameters()
    )


def test_posterior_term_is_off_by_default_and_weights_are_checked():
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6)
    values, times, mask = _data(4)
    guide = poutine.trace(kvae.guide).get_trace(values, times, mask)
    model = poutine.trace(poutine.replay(kvae.model, trace=guide)).get_trace(values, times, mask)
    site = model.nodes["koopman_penalty"]
    site["fn"].log_prob(site["value"]).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in kvae.encoder_head.parameters())
    assert "posterior" not in kvae.penalties
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="posterior_weight"):
            KoopmanVAE(5, posterior_weight=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="spectral_warmup"):
            KoopmanVAE(5, spectral_warmup=bad)


@pytest.mark.slow
@pytest.mark.parametrize("constraint", ["unit", "prescribed"])
def test_constrained_eigenvalues_recover_the_oscillators(constraint):
    """The tutorial's recipe (predictive and posterior weights 100, spectral penalty 200 after
    100 steps, 30 epochs of 500 sequences, seed 0): both eigenvalues within 0.05 of the truth
    0.913 +- 0.359i. Without the warm-up the "unit" penalty ends at the real pair -0.96, +0.99
    (distance about 0.37; module docstring)."""
    ds = pvae.data.load("oscillators", sizes=(500, 10, 10))
    true = pvae.data.true_eigenvalues(ds)
    torch.manual_seed(0)
    kvae = KoopmanVAE(
        2,
        z_dim=2,
        hidden=32,
        likelihood_kw={"scale": 0.05},
        predictive_weight=100.0,
        posterior_weight=100.0,
        constraint="unit" if constraint == "unit" else true,
        spectral_weight=200.0,
        spectral_warmup=100,
    )
    pvae.fit(
        kvae.model, kvae.guide, ds.train, engine=ELBO(), epochs=30, batch_size=50, seed=0, lr=3e-3
    )
    torch.manual_seed(0)
    eig = kvae.eigenvalues()
    assert float((eig[:, None] - true[None, :]).abs().min(0).values.max()) < 0.05
    if constraint == "unit":
        assert float((eig.abs() - 1).abs().max()) < 0.05


def test_path_decoder_reads_the_whole_path_and_the_mlp_one_step():
    """With ``decoder="gru"`` row t of the decoded mean changes when another step's z
    changes (the bidirectional GRU reads z_1..z_T); with the default MLP it does not. The
    forecast of the path decoder is the tail of the decoded path-plus-continuation."""
    torch.manual_seed(0)
    z = torch.randn(3, 6, 2)
    moved = z.clone()
    moved[:, 4] += 1.0
    for kind, coupled in (("mlp", False), ("gru", True)):
        kvae = KoopmanVAE(4, z_dim=2, hidden=8, decoder=kind, name=f"dec_{kind}")
        before, after = kvae.decode(z), kvae.decode(moved)
        assert before.shape == (3, 6, 4)
        changed = (after - before).abs().amax((0, 2)) > 1e-6  # per step
        assert bool(changed[4])
        assert bool(changed[[0, 1, 2, 3, 5]].all()) is coupled
        assert bool(changed[[0, 1, 2, 3, 5]].any()) is coupled
    values = torch.rand(3, 6, 4)
    path = kvae.posterior(*kvae._check(values, None, None)).mean
    future = kvae.prior_net.continue_means(path, 2)
    expected = kvae.decode(torch.cat([path, future], 1))[:, 6:]
    torch.testing.assert_close(kvae.forecast(values, 2), expected)
    assert kvae.sample(6, 5).shape == (5, 6, 4)
    with pytest.raises(ValueError, match="latent path"):
        kvae.decode(torch.zeros(2))


def test_path_decoder_trains_with_elbo_and_iwae():
    ds = pvae.data.load("sines", sizes=(32, 8, 8), missing=0.5)
    for engine in (ELBO(), IWAE(num_particles=3)):
        pyro.clear_param_store()
        kvae = KoopmanVAE(5, z_dim=3, hidden=8, decoder="gru")
        run = pvae.fit(
            kvae.model, kvae.guide, ds.train, engine=engine, epochs=2, batch_size=16, seed=0
        )
        assert all(math.isfinite(h["train_bound"]) for h in run.history)
    assert kvae.impute(ds.test.values, ds.test.times, ds.test.mask).shape == (8, 24, 5)
    with pytest.raises(ValueError, match="decoder"):
        KoopmanVAE(5, decoder="lstm")


def test_step_scale_fixes_the_priors_scale_after_the_first_step():
    """With ``step_scale`` the site 'z' is sum_t log N(z_t | mu(h_t), s_t) with s_1 the learned
    sigma(h_1) and s_t = step_scale after it (checked against the GRU cell), and prior rollouts
    move from one step to the next by mu(h_t) plus noise of that scale."""
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6, step_scale=0.01).eval()
    values, times, mask = _data(4)
    guide = poutine.trace(kvae.guide).get_trace(values, times, mask)
    model = poutine.trace(poutine.replay(kvae.model, trace=guide)).get_trace(values, times, mask)
    z = guide.nodes["z"]["value"]
    net = kvae.prior_net
    expected = _prior_by_hand(kvae, z, later_scale=0.01)
    torch.testing.assert_close(model.nodes["z"]["fn"].log_prob(z), expected, atol=1e-4, rtol=1e-5)
    # rollouts: the residual of each step after the first against mu(h_t) has sd 0.01
    with torch.no_grad():
        paths = net.rollout(2000, 5)
        loc, _ = net.conditionals(paths)
    residual = (paths - loc)[:, 1:]
    # 2000 * 4 * 3 residuals: the sd's relative standard error is about 0.5%; 3% is 6 SE
    assert abs(float(residual.std()) / 0.01 - 1) < 0.03
    first = (paths - loc)[:, 0].std(0)  # the learned sigma(h_1), not 0.01
    assert bool((first > 0.1).all())
    with pytest.raises(ValueError, match="step_scale"):
        KoopmanVAE(5, step_scale=0.0)


def test_output_range_keeps_decoded_means_and_samples_inside_it():
    """``output_range=(0.5, 1.0)`` squashes the Gaussian mean: decoded means of any latent,
    samples and imputations lie inside the range, where the unbounded decoder's leave it."""
    torch.manual_seed(0)
    z = 20 * torch.randn(200, 24, 3)  # far-out latents
    plain = KoopmanVAE(5, z_dim=3, hidden=8, name="plain")
    bounded = KoopmanVAE(5, z_dim=3, hidden=8, output_range=(0.5, 1.0), name="bounded")
    assert not bool(((plain.decode(z) > 0.5) & (plain.decode(z) < 1.0)).all())
    for x in (bounded.decode(z), bounded.sample(24, 50)):
        assert bool(((x >= 0.5) & (x <= 1.0)).all())
    ds = pvae.data.load("sines", sizes=(32, 8, 8), missing=0.5)
    run = pvae.fit(bounded.model, bounded.guide, ds.train, epochs=1, batch_size=16, seed=0)
    assert math.isfinite(run.history[-1]["train_bound"])
    for bad in ((1.0, 0.5), (0.0, math.inf), "wide", (1.0,)):
        with pytest.raises(ValueError, match="output_range"):
            KoopmanVAE(5, output_range=bad)
    with pytest.raises(ValueError, match="gaussian"):
        KoopmanVAE(5, likelihood="bernoulli", output_range=(0.0, 1.0))


def test_sample_noise_scale_multiplies_the_priors_noise():
    """With ``noise_scale`` f each rollout step is ``mu(h_t) + f sigma(h_t) eps``: the residuals
    against the teacher-forced conditionals, over sigma, have sd f; f = 0 is the mean dynamics
    (every draw the same)."""
    torch.manual_seed(0)
    kvae = KoopmanVAE(5, z_dim=3, hidden=6).eval()
    net = kvae.prior_net
    with torch.no_grad():
        for factor in (0.5, 2.0):
            paths = net.rollout(2000, 5, noise_scale=factor)
            loc, scale = net.conditionals(paths)
            # 30,000 standardised residuals: the sd's relative standard error is 0.4%; 3% is 7 SE
            assert abs(float(((paths - loc) / scale).std()) / factor - 1) < 0.03
    still = kvae.sample(6, 4, noise_scale=0.0)
    torch.testing.assert_close(still, kvae.sample(6, 4, noise_scale=0.0))
    assert not torch.allclose(kvae.sample(6, 4), kvae.sample(6, 4))
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="noise_scale"):
            kvae.sample(6, 4, noise_scale=bad)
