"""Likelihood heads ``p(x | decoder output)``, chosen by name and shared by every model.

Each head is a :class:`torch.nn.Module`, so a learned parameter (the Gaussian log-scale) is
registered with Pyro through the ``pyro.module`` call that registers the decoder::

    lik = pvae.likelihoods.get("bernoulli", x_dim=784)
    params = decoder(z)                                   # (..., x_dim * lik.param_size)
    pyro.sample("x", lik(params).to_event(1), obs=x)      # lik(params).batch_shape == (..., x_dim)

Parameter layout
----------------
A decoder emits ``params`` of shape ``(..., x_dim * param_size)``. Every likelihood reads it as
``params.reshape(..., x_dim, param_size)``: the ``param_size`` numbers that belong to data
dimension ``i`` are contiguous, ``params[..., i * param_size : (i + 1) * param_size]``. When
``param_size == 1`` the params are used as they are, with shape ``(..., x_dim)``.
:class:`pvae.nets.ConvDecoder` writes its output in this layout.

Support checks
--------------
``lik(params)`` is on the hot path and does no checking of its own (Pyro's global
``pyro.enable_validation`` still applies to the distribution it returns).
``lik.check_support(x)`` makes one full pass over a data set, raising :class:`ValueError` with
a message that names the argument, says what was expected and shows an offending entry. The
training loop calls it once per data set.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch import Tensor, nn

__all__ = [
    "Likelihood",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "GaussianLikelihood",
    "PoissonLikelihood",
    "CategoricalLikelihood",
    "available",
    "get",
]


def _index_str(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _violation(x: Tensor, bad: Tensor, name: str) -> str:
    """Describe the entries of ``x`` where the boolean mask ``bad`` is true.

    Returns e.g. ``"37 of 78400 values of x are not ..., e.g. x[0, 152] = 0.3529"`` minus the
    predicate, which the caller supplies.
    """
    count = int(bad.sum())
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    value = x[first].item()
    return f"{count} of {x.numel()} values of {name}; e.g. {name}{_index_str(first)} = {value:.6g}"


class Likelihood(nn.Module):
    """Base class: a map from decoder outputs to a distribution over one datapoint.

    Subclasses set :attr:`name`, :attr:`support` (a phrase used in error messages) and
    ``param_size``, and implement :meth:`forward`, :meth:`mean` and :meth:`_check_values`.

    :param x_dim: number of data dimensions ``D``; the returned distributions have
        ``batch_shape == (..., D)``.
    """

    name: ClassVar[str] = ""
    support: str = ""

    x_dim: int
    param_size: int

    def __init__(self, x_dim: int) -> None:
        super().__init__()
        if isinstance(x_dim, bool) or not isinstance(x_dim, int) or x_dim < 1:
            raise ValueError(f"x_dim must be a positive int, got {x_dim!r}")
        self.x_dim = x_dim
        self.param_size = 1

    def forward(self, params: Tensor) -> TorchDistributionMixin:
        """Distribution of ``x`` given decoder outputs.

        :param params: ``(..., x_dim * param_size)``, laid out as ``(x_dim, param_size)``.
        :returns: a Pyro distribution with ``batch_shape == (..., x_dim)`` and empty
            ``event_shape``; the caller adds ``.to_event(1)``.
        """
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """Mean of ``x`` given ``params`` ``(..., x_dim * param_size)``; shape ``(..., x_dim)``."""
        raise NotImplementedError

    def _unflatten(self, params: Tensor) -> Tensor:
        """``(..., x_dim * param_size)`` -> ``(..., x_dim, param_size)``."""
        return params.reshape(*params.shape[:-1], self.x_dim, self.param_size)

    def check_support(self, x: Tensor, name: str = "x") -> None:
        """Raise :class:`ValueError` unless every entry of ``x`` lies in the support.

        Checks that ``x`` is a tensor whose last dimension is ``x_dim``, that it holds no NaN
        or infinite values, and then the likelihood's own support. Makes one full pass over
        ``x``; meant to be called once per data set, not every step.

        :param x: data, ``(..., x_dim)``.
        :param name: how the data are named in the error message.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.x_dim:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, but likelihood {self.name!r} was built "
                f"for x_dim={self.x_dim} (expected shape (..., {self.x_dim}))"
            )
        if x.numel() == 0:
            return
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        if x.is_floating_point() or x.is_complex():
            nonfinite = ~torch.isfinite(x)
            if bool(nonfinite.any()):
                num_nan = int(torch.isnan(x).sum())
                num_inf = int(nonfinite.sum()) - num_nan
                raise ValueError(
                    f"{name} contains {num_nan} NaN and {num_inf} infinite values "
                    f"({_violation(x, nonfinite, name)}); likelihood {self.name!r} needs "
                    f"{self.support}"
                )
        self._check_values(x, name)

    def _check_values(self, x: Tensor, name: str) -> None:
        """Support check on finite data of the right shape; the default accepts anything."""

    def extra_repr(self) -> str:
        return f"x_dim={self.x_dim}, param_size={self.param_size}"


def _is_integer(x: Tensor) -> Tensor:
    if x.is_floating_point():
        return x == torch.round(x)
    return torch.ones_like(x, dtype=torch.bool)


class _SummedBernoulli(dist.Independent):
    """``Bernoulli(logits).to_event(n)`` whose log-density sums the binary cross-entropy over
    the event dimensions before flipping its sign: one pass fewer over a (particles, batch,
    pixels) array, forward and backward, than the elementwise ``Bernoulli.log_prob``."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        if value.shape != logits.shape:  # torch.broadcast_shapes costs ~50 us in Python
            value = value.expand(torch.broadcast_shapes(logits.shape, value.shape))
            logits = logits.expand_as(value)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -bce.sum(tuple(range(-self.reinterpreted_batch_ndims, 0)))


class _Bernoulli(dist.Bernoulli):
    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> dist.Independent:
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims == 0:
            return self  # type: ignore[return-value]
        return _SummedBernoulli(self, reinterpreted_batch_ndims)


class BernoulliLikelihood(Likelihood):
    """Bernoulli with logits: ``x_i ~ Bernoulli(sigmoid(params_i))``; ``param_size == 1``.

    Support: exactly ``{0, 1}``. Grey-level data are rejected by :meth:`check_support`; binarise
    them (``binarize="static"`` or ``"dynamic"``) or use ``"continuous_bernoulli"``.
    """

    name = "bernoulli"
    support = "binary values (exactly 0 or 1)"

    def forward(self, params: Tensor) -> TorchDistributionMixin:
        return _Bernoulli(logits=params)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def _check_values(self, x: Tensor, name: str) -> None:
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            raise ValueError(
                f"the data are not binary: {_violation(x, bad, name)}, but likelihood "
                f"'bernoulli' needs {self.support}. Binarize grey-level data with "
                f'binarize="static" or binarize="dynamic", or use '
                f'likelihood="continuous_bernoulli" for values in [0, 1]'
            )


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli with logits (Loaiza-Ganem and Cunningham, 2019).

    ``x_i ~ ContinuousBernoulli(logits=params_i)`` on ``[0, 1]``, with its normalising constant;
    ``param_size == 1``. :meth:`mean` is the distribution's mean, not ``sigmoid(logits)``.
    """

    name = "continuous_bernoulli"
    support = "values in [0, 1]"

    def forward(self, params: Tensor) -> TorchDistributionMixin:
        return dist.ContinuousBernoulli(logits=params)

    def mean(self, params: Tensor) -> Tensor:
        return dist.ContinuousBernoulli(logits=params, validate_args=False).mean

    def _check_values(self, x: Tensor, name: str) -> None:
        bad = (x < 0) | (x > 1)
        if bool(bad.any()):
            raise ValueError(
                f"{_violation(x, bad, name)} lie outside [0, 1], but likelihood "
                f"'continuous_bernoulli' needs {self.support}; rescale the data to [0, 1]"
            )


class GaussianLikelihood(Likelihood):
    """Gaussian with the decoder output as mean: ``x_i ~ Normal(params_i, scale_i)``.

    ``param_size == 1``.

    :param x_dim: number of data dimensions.
    :param scale: a positive float gives a fixed scale shared by all dimensions. ``None`` (the
        default) learns one scale per dimension, ``scale = exp(log_scale)``, with
        ``log_scale`` an ``nn.Parameter`` of shape ``(x_dim,)`` initialised to
        ``log(1.0) = 0``.
    """

    name = "gaussian"
    support = "finite real values"
    _fixed_scale: Tensor

    def __init__(self, x_dim: int, scale: float | None = None) -> None:
        super().__init__(x_dim)
        self.learn_scale = scale is None
        if scale is None:
            self.log_scale = nn.Parameter(torch.zeros(x_dim))
        else:
            if isinstance(scale, bool) or not isinstance(scale, int | float):
                raise ValueError(f"scale must be None or a positive float, got {scale!r}")
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"scale must be positive and finite, got {scale!r}")
            # Configuration, not state: not saved in state_dict.
            self.register_buffer("_fixed_scale", torch.tensor(float(scale)), persistent=False)

    @property
    def scale(self) -> Tensor:
        """The scale: ``(x_dim,)`` when learned, a scalar tensor when fixed."""
        if self.learn_scale:
            return self.log_scale.exp()
        return self._fixed_scale

    def forward(self, params: Tensor) -> TorchDistributionMixin:
        return dist.Normal(params, self.scale)

    def mean(self, params: Tensor) -> Tensor:
        return params

    def extra_repr(self) -> str:
        scale = "learned" if self.learn_scale else f"{float(self._fixed_scale):g}"
        return f"{super().extra_repr()}, scale={scale}"


class PoissonLikelihood(Likelihood):
    """Poisson with the decoder output as log-rate: ``x_i ~ Poisson(exp(params_i))``.

    ``param_size == 1``. Support: non-negative integers (float tensors holding whole numbers
    are accepted).
    """

    name = "poisson"
    support = "non-negative integer counts"

    def forward(self, params: Tensor) -> TorchDistributionMixin:
        return dist.Poisson(params.exp())

    def mean(self, params: Tensor) -> Tensor:
        return params.exp()

    def _check_values(self, x: Tensor, name: str) -> None:
        negative = x < 0
        if bool(negative.any()):
            raise ValueError(
                f"{_violation(x, negative, name)} are negative, but likelihood 'poisson' "
                f"needs {self.support}"
            )
        fractional = ~_is_integer(x)
        if bool(fractional.any()):
            raise ValueError(
                f"{_violation(x, fractional, name)} are not whole numbers, but likelihood "
                f"'poisson' needs {self.support}"
            )


class CategoricalLikelihood(Likelihood):
    """Categorical per dimension: ``x_i ~ Categorical(logits=params[..., i, :])``.

    ``param_size == num_categories``: the params ``(..., x_dim * C)`` are read as logits
    ``(..., x_dim, C)``. Support: integers in ``[0, C)`` (float tensors holding whole numbers are
    accepted). :meth:`mean` is the expected category index ``sum_c c * p_c``, a float in
    ``[0, C - 1]`` (e.g. a grey level for pictures).

    :param x_dim: number of data dimensions.
    :param num_categories: number of categories ``C >= 2`` (required).
    """

    name = "categorical"
    _categories: Tensor

    def __init__(self, x_dim: int, num_categories: int | None = None) -> None:
        super().__init__(x_dim)
        if num_categories is None:
            raise ValueError("likelihood 'categorical' needs num_categories=C (an int >= 2)")
        if (
            isinstance(num_categories, bool)
            or not isinstance(num_categories, int)
            or num_categories < 2
        ):
            raise ValueError(f"num_categories must be an int >= 2, got {num_categories!r}")
        self.num_categories = num_categories
        self.param_size = num_categories
        self.support = f"integers in [0, {num_categories}) (num_categories={num_categories})"
        self.register_buffer(
            "_categories", torch.arange(num_categories, dtype=torch.float32), persistent=False
        )

    def forward(self, params: Tensor) -> TorchDistributionMixin:
        return dist.Categorical(logits=self._unflatten(params))

    def mean(self, params: Tensor) -> Tensor:
        probs = torch.softmax(self._unflatten(params), dim=-1)
        return probs @ self._categories.to(probs.dtype)

    def _check_values(self, x: Tensor, name: str) -> None:
        bad = ~_is_integer(x) | (x < 0) | (x >= self.num_categories)
        if bool(bad.any()):
            raise ValueError(
                f"{_violation(x, bad, name)} are not category labels, but likelihood "
                f"'categorical' needs {self.support}"
            )

    def extra_repr(self) -> str:
        return f"x_dim={self.x_dim}, num_categories={self.num_categories}"


_REGISTRY: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (
        BernoulliLikelihood,
        ContinuousBernoulliLikelihood,
        GaussianLikelihood,
        PoissonLikelihood,
        CategoricalLikelihood,
    )
}


def available() -> list[str]:
    """Names accepted by :func:`get`, sorted."""
    return sorted(_REGISTRY)


def get(name: str, x_dim: int, **kw: Any) -> Likelihood:
    """Build the likelihood called ``name`` for ``x_dim``-dimensional data.

    :param name: one of :func:`available`: ``"bernoulli"``, ``"categorical"``
        (needs ``num_categories``), ``"continuous_bernoulli"``, ``"gaussian"`` (optional
        ``scale``: ``None`` learns it, a float fixes it), ``"poisson"``.
    :param x_dim: number of data dimensions.
    :param kw: passed to the likelihood's constructor.
    :raises ValueError: for an unknown name (the message lists the valid ones) or bad arguments.
    """
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown likelihood {name!r}; valid names are: {', '.join(available())}"
        ) from None
    try:
        return cls(x_dim, **kw)
    except TypeError as error:
        raise ValueError(f"bad arguments {kw!r} for likelihood {name!r}: {error}") from None
