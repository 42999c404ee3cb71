"""The SequenceVAE protocol: one signature for ``impute``, ``forecast`` and ``sample`` across
the sequence models, the deprecated argument orders still answered, forecasts against dense
Gaussian truths, the one imputation metric, and no internal warnings from the zoo's pairs."""

import math
import warnings

import pytest
import torch

import pvae
from pvae.inference import ELBO
from pvae.metrics import imputation_error
from pvae.models import GPVAE, HierarchicalVAE, KoopmanVAE, MarkovianGPVAE, StructuredVAE
from pvae.models.multimodal_gp import MultimodalGPVAE
from pvae.protocol import SequenceVAE

B, T, X = 3, 8, 4


def _split(seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(B, T, X, generator=g)
    times = torch.cumsum(0.5 + torch.rand(B, T, generator=g), -1)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return values, times, mask


def _models():
    return {
        "svae": StructuredVAE(X, z_dim=2, hidden=(8,), name="proto_svae"),
        "mgpvae": MarkovianGPVAE(X, z_dim=2, hidden=(8,), name="proto_mgpvae"),
        "gpvae": GPVAE(X, z_dim=2, hidden=(8,), name="proto_gpvae"),
        "kvae": KoopmanVAE(X, z_dim=2, hidden=8, name="proto_kvae"),
    }


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.mark.parametrize("name", ["svae", "mgpvae", "gpvae", "kvae"])
def test_every_sequence_model_answers_the_protocol_with_its_shapes(models, name):
    model = models[name].eval()
    assert isinstance(model, SequenceVAE)
    values, times, mask = _split()
    filled = model.impute(values, times, mask)
    assert filled.shape == values.shape
    assert torch.equal(filled[mask], values[mask])  # observed frames as given
    assert torch.equal(model.impute(values, mask=mask, times=times), filled)
    assert model.forecast(values, 5, times, mask).shape == (B, 5, X)
    assert model.sample(6, 2).shape == (2, 6, X)
    assert model.sample(6, num_samples=2, times=torch.arange(6.0) * 0.5).shape == (2, 6, X)
    with pytest.raises(ValueError, match="steps"):
        model.forecast(values, 0, times, mask)
    with pytest.raises(ValueError, match="num_steps"):
        model.sample(0)


@pytest.mark.parametrize("name", ["svae", "kvae"])
def test_the_old_mask_first_order_still_works_with_a_deprecation_warning(models, name):
    model = models[name].eval()
    values, times, mask = _split()
    with pytest.warns(DeprecationWarning, match="old argument order"):
        old = model.impute(values, mask, times)
    torch.testing.assert_close(old, model.impute(values, times, mask))
    with pytest.warns(DeprecationWarning, match="old argument order"):
        old = model.forecast(values, 3, mask, times)
    torch.testing.assert_close(old, model.forecast(values, 3, times, mask))


@pytest.mark.parametrize("name", ["mgpvae", "gpvae"])
def test_the_old_times_first_sample_still_works_with_a_deprecation_warning(models, name):
    model = models[name].eval()
    stamps = torch.arange(5.0) * 0.7
    with pytest.warns(DeprecationWarning, match="old argument order"):
        assert model.sample(stamps, 3).shape == (3, 5, X)


def _gp_prediction(kernel, times, y, noise, weight, bias, ahead):
    """E[w f(t*) + b | y] for y_t = w f(t_t) + b + e_t, f ~ GP(0, k): dense Gaussian
    conditioning, solved without a Cholesky factor."""
    stamps = torch.cat([times, ahead])
    K = kernel(stamps)
    n = times.shape[0]
    cov_y = weight**2 * K[:n, :n] + noise * torch.eye(n, dtype=K.dtype)
    gain = weight * K[n:, :n] @ torch.linalg.inv(cov_y)
    return weight * (gain @ (y - bias)) + bias


def test_markovian_forecast_is_the_dense_gp_prediction():
    """Linear-Gaussian decoder, exact potentials: the forecast is ``w E[f(t_T + k gap) | y]
    + b``, E from the dense Matérn-3/2 GP on all stamps (float64, to 1e-8)."""
    model = MarkovianGPVAE(
        1, z_dim=1, nu=1.5, net="linear", likelihood="gaussian", exact_potentials=True,
        lengthscale=1.3, variance=0.8, name="proto_forecast",
    ).double()  # fmt: skip
    with torch.no_grad():
        model.decoder.weight.fill_(0.9)
        model.decoder.bias.fill_(0.2)
        model.likelihood.log_scale.fill_(math.log(0.4))
    g = torch.Generator().manual_seed(1)
    times = torch.cumsum(0.3 + torch.rand(T, generator=g, dtype=torch.float64), 0)
    y = torch.randn(1, T, 1, generator=g, dtype=torch.float64)
    got = model.forecast(y, 3, times, gap=0.6)[0, :, 0]
    with torch.no_grad():
        lengthscale, variance = float(model.gp.lengthscale()), float(model.gp.variance())

    def matern32(t):
        r = math.sqrt(3) * (t[:, None] - t[None, :]).abs() / lengthscale
        return variance * (1 + r) * torch.exp(-r)

    ahead = times[-1] + 0.6 * torch.arange(1, 4, dtype=torch.float64)
    want = _gp_prediction(matern32, times, y[0, :, 0], 0.16, 0.9, 0.2, ahead)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


def test_gpvae_forecast_decodes_the_gp_conditional_mean_of_the_posterior_mean():
    model = GPVAE(X, z_dim=2, hidden=(8,), kernel="rbf", jitter=1e-4, name="proto_gpf").double()
    values, times, mask = _split()
    values, times = values.double(), times.double()
    got = model.forecast(values, 4, times, mask, gap=0.5)
    with torch.no_grad():
        x, _, entries = model._check(values, times, mask, None)
        m = model.posterior(x, entries).mean  # (B, L, T)
        ahead = times[:, -1:] + 0.5 * torch.arange(1, 5, dtype=torch.float64)
        stamps = torch.cat([times, ahead], -1)
        K = model.kernel(stamps[..., None]).to_dense() + 1e-4 * torch.eye(T + 4).double()
        future = K[:, T:, :T] @ torch.linalg.solve(K[:, :T, :T], m.mT)  # (B, 4, L)
        want = model.decode(future)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


# -- the one imputation metric -----------------------------------------------------------------
class _Fill:
    """A stand-in sequence model: hidden entries filled with 0.5."""

    training = True

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def impute(self, values, times=None, mask=None, observed=None):
        given = mask[..., None].expand(values.shape)
        if observed is not None:
            given = given & observed
        return torch.where(given, values, torch.full_like(values, 0.5))


def test_imputation_error_scores_the_missing_entries_against_the_clean_frames():
    values, times, mask = _split()
    truth = torch.rand(values.shape, generator=torch.Generator().manual_seed(5))
    out = imputation_error(_Fill(), (values, times, mask), truth)
    missing = ~mask
    assert out["held_out_frames"] == int(missing.sum())
    assert out["held_out_entries"] == int(missing.sum()) * X
    assert out["imputation_mse"] == pytest.approx(float((0.5 - truth[missing]).pow(2).mean()))
    mean_frame = values[mask].mean(0)
    baseline = float((mean_frame - truth[missing]).pow(2).mean())
    assert out["imputation_mse_mean_frame"] == pytest.approx(baseline)
    # a per-entry mask: unobserved entries of observed frames are scored too
    observed = torch.rand(values.shape, generator=torch.Generator().manual_seed(6)) > 0.5
    out = imputation_error(_Fill(), (values, times, mask, observed), truth)
    held = ~(mask[..., None] & observed)
    assert out["held_out_entries"] == int(held.sum())
    assert out["imputation_mse"] == pytest.approx(float((0.5 - truth[held]).pow(2).mean()))


def test_imputation_error_without_truth_hides_a_seeded_share_of_observed_frames():
    values, times, _ = _split()
    complete = torch.ones(B, T, dtype=torch.bool)
    model = _Fill()
    first = imputation_error(model, (values, times, complete), seed=3)
    assert first == imputation_error(model, (values, times, complete), seed=3)
    assert 0 < first["held_out_frames"] < B * T and model.training  # left as found
    with pytest.raises(ValueError, match="split"):
        imputation_error(model, (values, times))
    with pytest.raises(ValueError, match="truth"):
        imputation_error(model, (values, times, complete), truth=values[:1])


# -- no internal warnings from the zoo's pairs -------------------------------------------------
_INTERNAL = ("feed both", "different orders")


def _fit_quietly(model, data, engine=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pvae.fit(
            model.model, model.guide, data, engine=engine or ELBO(), epochs=1,
            batch_size=len(data[0]) if isinstance(data, tuple) else len(data), progress=False,
        )  # fmt: skip
    return [str(w.message) for w in caught if any(k in str(w.message) for k in _INTERNAL)]


def _binary():
    return torch.bernoulli(torch.rand(8, 12, generator=torch.Generator().manual_seed(0)))


def _mm_data():
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(2 * torch.ones(4, 10, 6), generator=g)
    frames = torch.rand(4, 10, 1, 8, 8, generator=g)
    times = torch.arange(10, dtype=torch.float32).expand(4, 10) * 0.5
    return counts, frames, times, torch.ones(4, 2, dtype=torch.bool)


@pytest.mark.parametrize(
    "build",
    [
        lambda: (StructuredVAE(X, z_dim=2, hidden=(8,), name="quiet_svae"), _split()),
        lambda: (MarkovianGPVAE(X, z_dim=2, hidden=(8,), name="quiet_mgpvae"), _split()),
        lambda: (
            StructuredVAE(X, 2, (8,), "gaussian", "linear", exact_potentials=True,
                          name="quiet_svae_exact"),
            _split(),
        ),  # fmt: skip
        lambda: (MultimodalGPVAE(6, hidden=(16,), name="quiet_mm"), _mm_data()),
        lambda: (
            MultimodalGPVAE(6, hidden=(16,), analytic_poisson=True, name="quiet_mm_a"),
            _mm_data(),
        ),
        lambda: (HierarchicalVAE(12, (4, 2), (8, 6), inference="bottom-up"), _binary()),
        lambda: (HierarchicalVAE(12, (4, 2), (8, 6), inference="ladder"), _binary()),
    ],
    ids=["svae", "mgpvae", "svae-exact", "mmgpvae", "mmgpvae-analytic", "hvae-bottom-up",
         "hvae-ladder"],
)  # fmt: skip
def test_training_a_zoo_model_prints_no_internal_warning(build):
    model, data = build()
    assert _fit_quietly(model, data) == []


def test_an_undeclared_user_pair_still_gets_both_warnings():
    """The declarations are per model: a pair without them is warned as before."""
    hvae = HierarchicalVAE(12, (4, 2), (8, 6), inference="bottom-up")

    def model(x):
        return hvae.model(x)

    def guide(x):
        return hvae.guide(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pvae.fit(model, guide, _binary(), engine=ELBO(), epochs=1, batch_size=8,
                 progress=False)  # fmt: skip
    assert any("different orders" in str(w.message) for w in caught)
    svae = StructuredVAE(X, z_dim=2, hidden=(8,), name="loud_svae")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pvae.fit(lambda *a: svae.model(*a), lambda *a: svae.guide(*a), _split(), epochs=1,
                 batch_size=B, progress=False)  # fmt: skip
    assert any("feed both" in str(w.message) for w in caught)
