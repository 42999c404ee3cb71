"""The generated sequence sets of pvae.data.oscillators: sines, oscillators, irregular variants."""

import math

import pytest
import torch

import pvae
from pvae.models.koopman import koopman_operator


def test_sines_follow_the_recipe():
    ds = pvae.data.load("sines", sizes=(50, 10, 10), seed=3)
    values = ds.train.values
    assert values.shape == (50, 24, 5)
    assert ds.train.mask.all()
    assert values.min() >= 0 and values.max() <= 1
    # x_t = (sin(f t + phi) + 1) / 2 with f, phi in (0, 0.1): asin inverts it exactly while
    # f t + phi < pi / 2, which holds for t <= 14 (14 * 0.1 + 0.1 = 1.5)
    angle = torch.asin(2 * values - 1)
    phase = angle[:, 0]
    frequency = angle[:, 1] - angle[:, 0]
    assert (phase > 0).all() and (phase < 0.1 + 1e-5).all()
    assert (frequency > 0).all() and (frequency < 0.1 + 1e-5).all()
    steps = torch.arange(15.0)
    expected = torch.sin(frequency[:, None] * steps[:, None] + phase[:, None])
    torch.testing.assert_close(2 * values[:, :15] - 1, expected, atol=1e-5, rtol=0)
    again = pvae.data.load("sines", sizes=(50, 10, 10), seed=3)
    assert torch.equal(again.train.values, values)


@pytest.mark.parametrize("share", [0.3, 0.5, 0.7])
def test_irregular_variants_drop_that_share_of_rows(share):
    name = f"sines-{round(100 * share)}"
    ds = pvae.data.load(name, sizes=(20, 5, 5))
    hidden = (~ds.train.mask).sum(1)
    assert (hidden == round(share * 24)).all()
    assert (ds.train.values[~ds.train.mask] == 0).all()
    complete = ds.truth["train"]["complete"]
    assert torch.equal(ds.train.values[ds.train.mask], complete[ds.train.mask])
    assert pvae.data.load(f"oscillators-{round(100 * share)}", sizes=(4, 1, 1)).train.mask.any()


def test_linear_oscillator_eigenvalues_are_those_of_its_flow():
    # noise-free linear data: the least-squares Koopman matrix of the observations is the
    # one-step flow, whose eigenvalues are exp(dt (-zeta omega +- i omega sqrt(1 - zeta^2)))
    ds = pvae.data.load("oscillators", sizes=(30, 5, 5), omega=1.5, zeta=0.1, dt=0.25)
    A = koopman_operator(ds.truth["train"]["complete"].double())
    eig = torch.linalg.eigvals(A)
    true = pvae.data.true_eigenvalues(ds).to(torch.complex128)
    rate = complex(-0.15, 1.5 * math.sqrt(1 - 0.01)) * 0.25
    assert abs(complex(true[0]) - complex(torch.exp(torch.tensor(rate)))) < 1e-6
    eig = eig[eig.imag.argsort(descending=True)]
    true = true[true.imag.argsort(descending=True)]
    torch.testing.assert_close(eig, true, atol=1e-5, rtol=0)


def test_pendulum_at_small_amplitude_has_the_linearised_eigenvalues():
    ds = pvae.data.load(
        "oscillators", sizes=(30, 5, 5), system="pendulum", max_amplitude=0.05, zeta=0.1
    )
    eig = torch.linalg.eigvals(koopman_operator(ds.truth["train"]["complete"].double()))
    true = pvae.data.true_eigenvalues(ds).to(torch.complex128)
    eig = eig[eig.imag.argsort(descending=True)]
    true = true[true.imag.argsort(descending=True)]
    torch.testing.assert_close(eig, true, atol=2e-3, rtol=0)  # sin(theta) ~ theta to 4e-4
    large = pvae.data.load(
        "oscillators", sizes=(30, 5, 5), system="pendulum", max_amplitude=1.5, zeta=0.1
    )
    eig_large = torch.linalg.eigvals(koopman_operator(large.truth["train"]["complete"].double()))
    assert (eig_large.angle().abs().max() - true.angle().abs().max()).abs() > 1e-2  # nonlinear


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="system"):
        pvae.data.load("oscillators", system="spring")
    with pytest.raises(ValueError, match="channels"):
        pvae.data.load("sines", channels=0)
    with pytest.raises(ValueError, match="zeta"):
        pvae.data.load("oscillators", zeta=1.0)
    with pytest.raises(TypeError, match="missing"):
        pvae.data.load("sines-30", missing=0.1)
    with pytest.raises(ValueError, match="no eigenvalues"):
        pvae.data.true_eigenvalues(pvae.data.load("sines", sizes=(2, 1, 1)))
