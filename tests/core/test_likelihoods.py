"""Likelihood heads: densities against direct torch.distributions computations, shapes,
learned vs fixed Gaussian scale, and the support checks' error messages."""

import math

import pyro
import pytest
import torch
import torch.distributions as tdist
from pyro.distributions.torch_distribution import TorchDistributionMixin

import pvae.likelihoods as likelihoods

X_DIM = 5
BATCH = (2, 3)


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


def _data(name: str, num_categories: int = 4) -> torch.Tensor:
    """Valid data of shape (*BATCH, X_DIM) for each likelihood."""
    shape = (*BATCH, X_DIM)
    if name == "bernoulli":
        return torch.randint(0, 2, shape).float()
    if name == "continuous_bernoulli":
        return torch.rand(shape)
    if name == "gaussian":
        return torch.randn(shape)
    if name == "poisson":
        return torch.randint(0, 10, shape).float()
    if name == "categorical":
        return torch.randint(0, num_categories, shape).float()
    raise AssertionError(name)


def _kwargs(name: str) -> dict:
    return {"num_categories": 4} if name == "categorical" else {}


def test_available():
    assert likelihoods.available() == [
        "bernoulli",
        "categorical",
        "continuous_bernoulli",
        "gaussian",
        "poisson",
    ]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown likelihood 'bernouli'") as info:
        likelihoods.get("bernouli", X_DIM)
    for name in likelihoods.available():
        assert name in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_categories"):
        likelihoods.get("categorical", X_DIM)
    with pytest.raises(ValueError, match="num_categories must be an int >= 2"):
        likelihoods.get("categorical", X_DIM, num_categories=1)
    with pytest.raises(ValueError, match="scale must be positive"):
        likelihoods.get("gaussian", X_DIM, scale=0.0)
    with pytest.raises(ValueError, match="bad arguments"):
        likelihoods.get("bernoulli", X_DIM, scale=1.0)
    with pytest.raises(ValueError, match="x_dim must be a positive int"):
        likelihoods.get("bernoulli", 0)


def _continuous_bernoulli(logits: torch.Tensor, x: torch.Tensor):
    """Closed-form log-density and mean of the continuous Bernoulli (in float64).

    p(x | l) = C(l) l^x (1 - l)^(1 - x), C(l) = 2 atanh(1 - 2l) / (1 - 2l),
    E[x] = l / (2l - 1) + 1 / (2 atanh(1 - 2l)).
    """
    lam = torch.sigmoid(logits.double())
    log_norm = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    x = x.double()
    log_prob = log_norm + x * torch.log(lam) + (1 - x) * torch.log1p(-lam)
    mean = lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam))
    return log_prob.float(), mean.float()


def _reference(name: str, params: torch.Tensor, x: torch.Tensor):
    """log p(x) and E[x] written directly with torch.distributions or closed forms."""
    if name == "bernoulli":
        d = tdist.Bernoulli(probs=torch.sigmoid(params))
        return d.log_prob(x), d.mean
    if name == "continuous_bernoulli":
        return _continuous_bernoulli(params, x)
    if name == "gaussian":
        d = tdist.Normal(params, 0.7)
        return d.log_prob(x), d.mean
    if name == "poisson":
        d = tdist.Poisson(torch.exp(params))
        return d.log_prob(x), d.mean
    if name == "categorical":
        probs = torch.softmax(params.reshape(*params.shape[:-1], X_DIM, 4), -1)
        mean = (probs * torch.arange(4.0)).sum(-1)  # expected category index
        return tdist.Categorical(probs=probs).log_prob(x), mean
    raise AssertionError(name)


@pytest.mark.parametrize("name", likelihoods.available())
def test_log_prob_shape_and_mean(name):
    kw = _kwargs(name)
    if name == "gaussian":
        kw = {"scale": 0.7}
    lik = likelihoods.get(name, X_DIM, **kw)
    assert lik.x_dim == X_DIM
    params = torch.randn(*BATCH, X_DIM * lik.param_size)
    if name == "continuous_bernoulli":
        # keep lambda away from 1/2, where the closed form is 0/0 (torch uses a Taylor series)
        params = params.sign() * (params.abs() + 0.1)
    x = _data(name)
    d = lik(params)
    assert isinstance(d, TorchDistributionMixin)
    assert d.batch_shape == (*BATCH, X_DIM)
    assert d.event_shape == ()
    expected, expected_mean = _reference(name, params, x)
    torch.testing.assert_close(d.log_prob(x), expected)
    # .to_event(1) sums over data dimensions, as the models use it.
    torch.testing.assert_close(d.to_event(1).log_prob(x), expected.sum(-1))
    mean = lik.mean(params)
    assert mean.shape == (*BATCH, X_DIM)
    torch.testing.assert_close(mean, expected_mean)
    lik.check_support(x)  # valid data pass


def test_param_sizes():
    assert likelihoods.get("bernoulli", X_DIM).param_size == 1
    assert likelihoods.get("continuous_bernoulli", X_DIM).param_size == 1
    assert likelihoods.get("gaussian", X_DIM).param_size == 1
    assert likelihoods.get("poisson", X_DIM).param_size == 1
    assert likelihoods.get("categorical", X_DIM, num_categories=7).param_size == 7


def test_categorical_layout():
    """params (..., x_dim * C) are read as (..., x_dim, C): dimension i owns a contiguous block."""
    num_categories = 3
    lik = likelihoods.get("categorical", 2, num_categories=num_categories)
    big = 20.0
    # dimension 0 -> category 2, dimension 1 -> category 0
    params = torch.tensor([0.0, 0.0, big, big, 0.0, 0.0])
    assert lik(params).probs.argmax(-1).tolist() == [2, 0]
    torch.testing.assert_close(lik.mean(params), torch.tensor([2.0, 0.0]), atol=1e-6, rtol=0)


def test_gaussian_fixed_scale():
    lik = likelihoods.get("gaussian", X_DIM, scale=0.3)
    assert list(lik.parameters()) == []
    assert lik.state_dict() == {}
    params = torch.randn(4, X_DIM)
    d = lik(params)
    torch.testing.assert_close(d.scale, torch.full((4, X_DIM), 0.3))


def test_gaussian_learned_scale_gets_gradient():
    lik = likelihoods.get("gaussian", X_DIM)
    assert lik.learn_scale
    (log_scale,) = list(lik.parameters())
    assert isinstance(log_scale, torch.nn.Parameter)
    assert log_scale.shape == (X_DIM,)
    torch.testing.assert_close(log_scale.detach(), torch.full((X_DIM,), math.log(1.0)))
    x = torch.randn(8, X_DIM) * 3.0
    params = torch.zeros(8, X_DIM, requires_grad=True)
    lik(params).to_event(1).log_prob(x).sum().backward()
    assert log_scale.grad is not None
    assert torch.all(log_scale.grad != 0)
    assert params.grad is not None
    # d/d log_scale of sum_n log N(x | 0, s) at s = 1 is sum_n (x^2 - 1).
    torch.testing.assert_close(log_scale.grad, (x**2 - 1).sum(0))


def test_learned_scale_is_registered_by_pyro_module():
    pyro.clear_param_store()
    lik = likelihoods.get("gaussian", X_DIM)
    pyro.module("lik", lik)
    assert "lik$$$log_scale" in pyro.get_param_store().keys()


def test_bernoulli_rejects_grey_pixels():
    lik = likelihoods.get("bernoulli", 4)
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.35, 1.0, 0.5]])
    with pytest.raises(ValueError) as info:
        lik.check_support(x, name="train")
    message = str(info.value)
    assert "not binary" in message
    assert "2 of 8 values of train" in message
    assert "train[1, 1] = 0.35" in message
    assert 'binarize="static"' in message
    assert 'binarize="dynamic"' in message
    assert "continuous_bernoulli" in message


def test_bernoulli_accepts_binary_of_any_dtype():
    lik = likelihoods.get("bernoulli", 3)
    lik.check_support(torch.tensor([[0.0, 1.0, 1.0]]))
    lik.check_support(torch.tensor([[0, 1, 1]], dtype=torch.uint8))
    lik.check_support(torch.tensor([[False, True, True]]))


def test_continuous_bernoulli_support():
    lik = likelihoods.get("continuous_bernoulli", 3)
    lik.check_support(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        lik.check_support(torch.tensor([[0.0, 1.5, 1.0]]))
    with pytest.raises(ValueError, match=r"x\[0, 0\] = -0.1"):
        lik.check_support(torch.tensor([[-0.1, 0.5, 1.0]]))


def test_poisson_rejects_negatives_and_fractions():
    lik = likelihoods.get("poisson", 3)
    lik.check_support(torch.tensor([[0.0, 3.0, 12.0]]))
    lik.check_support(torch.tensor([[0, 3, 12]]))
    with pytest.raises(ValueError, match="are negative") as info:
        lik.check_support(torch.tensor([[0.0, -2.0, 1.0]]))
    assert "non-negative integer" in str(info.value)
    assert "x[0, 1] = -2" in str(info.value)
    with pytest.raises(ValueError, match="not whole numbers") as info:
        lik.check_support(torch.tensor([[0.0, 2.5, 1.0]]))
    assert "non-negative integer" in str(info.value)
    assert "x[0, 1] = 2.5" in str(info.value)


def test_categorical_rejects_out_of_range():
    lik = likelihoods.get("categorical", 3, num_categories=4)
    lik.check_support(torch.tensor([[0, 3, 2]]))
    lik.check_support(torch.tensor([[0.0, 3.0, 2.0]]))
    for bad, shown in [([0, 4, 2], "x[0, 1] = 4"), ([-1, 0, 2], "x[0, 0] = -1")]:
        with pytest.raises(ValueError, match=r"integers in \[0, 4\)") as info:
            lik.check_support(torch.tensor([bad]))
        assert shown in str(info.value)
    with pytest.raises(ValueError, match=r"x\[0, 2\] = 1.5"):
        lik.check_support(torch.tensor([[0.0, 1.0, 1.5]]))


@pytest.mark.parametrize("name", likelihoods.available())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_rejected_by_every_likelihood(name, bad):
    lik = likelihoods.get(name, X_DIM, **_kwargs(name))
    x = _data(name)
    x[1, 2, 3] = bad
    with pytest.raises(ValueError) as info:
        lik.check_support(x, name="valid")
    message = str(info.value)
    assert "valid contains" in message
    assert ("1 NaN" if math.isnan(bad) else "1 infinite") in message
    assert "valid[1, 2, 3]" in message


@pytest.mark.parametrize("name", likelihoods.available())
def test_wrong_last_dimension_rejected(name):
    lik = likelihoods.get(name, X_DIM, **_kwargs(name))
    with pytest.raises(ValueError, match=rf"x_dim={X_DIM}"):
        lik.check_support(torch.zeros(3, X_DIM + 1))


def test_bernoulli_event_log_prob_matches_torch_and_its_gradient():
    """The summed-then-negated log-density equals Bernoulli(...).to_event(1) and its gradient."""
    lik = likelihoods.get("bernoulli", 6)
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randint(0, 2, (4, 6)).double()
    ours = lik(logits).to_event(1).log_prob(x)
    reference = torch.distributions.Independent(
        torch.distributions.Bernoulli(logits=logits), 1
    ).log_prob(x)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(
        torch.autograd.grad(ours.sum(), logits)[0], torch.autograd.grad(reference.sum(), logits)[0]
    )
    assert (
        lik(logits)
        .to_event(1)
        .mask(torch.tensor([True, False, True, True]))
        .log_prob(x)[:, 1]
        .eq(0)
        .all()
    )
