"""Importance-weighted bounds: IWAE, MIWAE, CIWAE and PIWAE, with the reparameterised, STL
and DReG estimators of the guide's gradient.

With log weights ``log w_i = log p(x, z_i) - log q(z_i | x)``, ``z_i ~ q(z | x)``::

    IWAE_K       = E[log (1/K) sum_k w_k]                                   (Burda et al. 2016)
    MIWAE(M, K)  = (1/M) sum_m E[log (1/K) sum_k w_mk]                  (Rainforth et al. 2018)
    CIWAE_beta   = beta * ELBO_K + (1 - beta) * IWAE_K                  (Rainforth et al. 2018)
    PIWAE(M, K)  : the model's parameters ascend IWAE_{MK}; the guide's ascend MIWAE(M, K) (or
                   the ELBO), from the same M*K samples            (Rainforth et al. 2018)

The log-mean-exp over particles is taken per datapoint of ``pyro.plate("data")`` and only then
scaled by N/B, so the reported value stays a lower bound of log p(x) under subsampling (unlike
Pyro's ``RenyiELBO(alpha=0)``, which scales before the log-sum-exp). When the guide has
latents outside the data plate (global latents), each particle's weight is the whole batch's
joint weight and the log-mean-exp is taken over those (exact IWAE on a full batch); under a
subsampled data plate such weights do not factorise and the engines raise an error.

Estimators of the guide's gradient (``estimator=``):

- ``"reparam"``: differentiate the bound through z and log q.
- ``"stl"`` (Roeder et al. 2017): log q is evaluated with the guide's parameters detached, so
  only the path through z carries gradient; zero variance at the exact posterior. Unbiased
  for the ELBO only: for an importance-weighted objective with K > 1 particles per group
  (IWAE, MIWAE with K > 1, CIWAE with beta < 1, PIWAE's MIWAE guide objective) the dropped
  score term sum_k w~_k d log q(z_k) / d phi does not vanish in expectation, so STL is biased
  (Tucker et al. 2018); the engines warn. Use ``"dreg"`` there.
- ``"dreg"`` (Tucker et al. 2018): the guide's gradient is sum_k stopgrad(w~_k^2) d log w_k
  along the path through z_k (w~ the normalised weights within each group); unbiased for
  IWAE, and its SNR grows with K. The model's gradient is unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from pvae.protocol import LogWeights, check_reparameterized, log_mean_exp
from pvae.steps import attribute_settings
from pvae.validation import finite_float, positive_int

from .base import ESTIMATORS, Engine, SplitLoss


def group_bound(weights: LogWeights, num_inner: int) -> torch.Tensor:
    """Mean over groups of ``num_inner`` particles of the per-datapoint log-mean-exp, scaled.

    ``num_inner == K`` gives IWAE_K, ``num_inner == 1`` the K-particle ELBO.
    """
    local = weights.local.reshape(-1, num_inner, weights.local.shape[-1])  # (M, K, B)
    per_datapoint = log_mean_exp(local, dim=1).mean(0)  # (B,)
    return weights.data_scale * per_datapoint.sum() + weights.global_.mean()


def dreg_surrogate(weights: LogWeights, num_inner: int) -> torch.Tensor:
    """The DReG surrogate of :func:`group_bound` for the guide (weights computed with the
    guide's parameters detached): its gradient is sum stopgrad(w~^2) d log w / d phi."""
    local = weights.local.reshape(-1, num_inner, weights.local.shape[-1])  # (M, K, B)
    normalised = torch.softmax(local.detach(), dim=1)
    per_datapoint = (normalised**2 * local).sum(1).mean(0)  # (B,)
    return weights.data_scale * per_datapoint.sum() + weights.global_.mean()


class _ImportanceEngine(Engine):
    """Shared machinery: draw ``num_outer * num_inner`` particles, check they are
    reparameterised, build the bound and the estimator's surrogates."""

    name = "importance"
    estimators = ESTIMATORS

    def __init__(
        self,
        num_outer: int,
        num_inner: int,
        estimator: str = "reparam",
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        data_plate: str = "data",
    ):
        self.num_outer = positive_int(num_outer, "num_outer")
        self.num_inner = positive_int(num_inner, "num_inner")
        super().__init__(
            self.num_outer * self.num_inner, vectorize_particles, max_plate_nesting, data_plate
        )
        if estimator not in self.estimators:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {self.estimators}")
        self.estimator = estimator
        self._owners: dict = {}  # the model/guide parameter split, computed once per pair
        if estimator == "stl" and any(k > 1 and c != 0 for k, c in self.guide_terms()):
            warnings.warn(
                f"{type(self).__name__} with estimator='stl' and K > 1 particles per group: "
                "the STL gradient of an importance-weighted bound is biased (Tucker et al. "
                "2018); use estimator='dreg', which is unbiased",
                stacklevel=3,
            )

    def settings(self) -> dict[str, Any]:
        names = ("num_outer", "num_inner", "estimator", "beta", "encoder_objective")
        return {**super().settings(), **attribute_settings(self, *names)}

    def _forget_pair(self) -> None:
        super()._forget_pair()
        self._owners = {}

    # What the model ascends and what the guide ascends, as (num_inner, weight) pairs mixed
    # linearly: IWAE is [(K, 1)], CIWAE [(1, beta), (K, 1 - beta)].
    def model_terms(self) -> list[tuple[int, float]]:
        raise NotImplementedError

    def guide_terms(self) -> list[tuple[int, float]]:
        return self.model_terms()

    def _mix(
        self, weights: LogWeights, terms: list[tuple[int, float]], fn: Callable
    ) -> torch.Tensor:
        return sum((c * fn(weights, k) for k, c in terms), torch.zeros(()))

    def objective(self, model, guide, args, kwargs):
        weights, draws = self.log_weights(
            model, guide, args, kwargs, self.num_particles, detach_guide=self.estimator != "reparam"
        )
        for _, guide_trace, _ in draws:
            check_reparameterized(guide_trace, type(self).__name__)
        weights = weights.per_datapoint(type(self).__name__)
        bound = self._mix(weights, self.model_terms(), group_bound)
        same_objective = self.model_terms() == self.guide_terms()
        if self.estimator != "dreg" and same_objective:
            self.guide_bound = float(bound.detach())
            return -bound, bound
        guide_fn = dreg_surrogate if self.estimator == "dreg" else group_bound
        guide_objective = self._mix(weights, self.guide_terms(), guide_fn)
        self.guide_bound = float(self._mix(weights, self.guide_terms(), group_bound).detach())
        loss = SplitLoss.from_draws(-bound, -guide_objective, draws, self._owners)
        return loss, bound


class IWAE(_ImportanceEngine):
    """Importance-weighted autoencoder bound IWAE_K (Burda et al. 2016).

    :param num_particles: K, importance samples per datapoint.
    :param estimator: "reparam", "stl" or "dreg" for the guide's gradient.
    :param kwargs: ``vectorize_particles``, ``max_plate_nesting``, ``data_plate``, as in
        :class:`MIWAE`.
    """

    def __init__(self, num_particles: int = 5, estimator: str = "reparam", **kwargs):
        positive_int(num_particles, "num_particles")
        super().__init__(1, num_particles, estimator, **kwargs)

    def model_terms(self):
        return [(self.num_inner, 1.0)]


class MIWAE(_ImportanceEngine):
    """The average of M independent IWAE_K bounds, MIWAE(M, K) (Rainforth et al. 2018): M*K
    samples per datapoint in all.

    :param num_outer: M, the independent bounds averaged.
    :param num_inner: K, the importance samples of each bound.
    :param estimator: "reparam", "stl" or "dreg" for the guide's gradient.
    :param kwargs: keyword arguments of the base engine:

        - ``vectorize_particles`` (default True): draw the M*K particles in one vectorised
          run of the pair, or one per run, in a loop, for pairs that cannot be vectorised
          (boolean-mask indexing, ``torch.cat`` of particle-dependent and per-datapoint
          tensors);
        - ``max_plate_nesting``: the pair's deepest plate nesting, guessed when omitted;
        - ``data_plate`` (default ``"data"``): the name of the plate holding the datapoints.
    """

    def __init__(
        self, num_outer: int = 8, num_inner: int = 8, estimator: str = "reparam", **kwargs
    ):
        super().__init__(num_outer, num_inner, estimator, **kwargs)

    def model_terms(self):
        return [(self.num_inner, 1.0)]


class CIWAE(_ImportanceEngine):
    """The combination beta * ELBO_K + (1 - beta) * IWAE_K from the same K samples, CIWAE
    (Rainforth et al. 2018).

    :param num_particles: K, importance samples per datapoint.
    :param beta: in [0, 1]; 1 gives the K-sample ELBO, 0 IWAE_K.
    :param estimator: "reparam", "stl" or "dreg" for the guide's gradient.
    :param kwargs: ``vectorize_particles``, ``max_plate_nesting``, ``data_plate``, as in
        :class:`MIWAE`.
    """

    def __init__(
        self, num_particles: int = 64, beta: float = 0.5, estimator: str = "reparam", **kwargs
    ):
        beta = finite_float(beta, "beta", minimum=0.0, maximum=1.0)
        self.beta = float(beta)
        positive_int(num_particles, "num_particles")
        super().__init__(1, num_particles, estimator, **kwargs)

    def model_terms(self):
        return [(1, self.beta), (self.num_inner, 1.0 - self.beta)]


class PIWAE(_ImportanceEngine):
    """Partially importance-weighted training, PIWAE(M, K) (Rainforth et al. 2018): the
    model's parameters follow IWAE_{MK}, the guide's follow MIWAE(M, K)
    (``encoder_objective="miwae"``) or the M*K-sample ELBO (``"elbo"``), from the same samples
    in one step. The guide never receives the IWAE gradient.

    The reported bound is IWAE_{MK} (the model's objective); ``guide_bound`` holds the guide's.

    :param num_outer: M, the groups of the guide's MIWAE objective.
    :param num_inner: K, the importance samples of each group (M*K per datapoint in all).
    :param encoder_objective: ``"miwae"`` or ``"elbo"``, the guide's objective.
    :param estimator: "reparam", "stl" or "dreg" for the guide's gradient.
    :param kwargs: ``vectorize_particles``, ``max_plate_nesting``, ``data_plate``, as in
        :class:`MIWAE`.
    """

    def __init__(
        self,
        num_outer: int = 8,
        num_inner: int = 8,
        encoder_objective: str = "miwae",
        estimator: str = "reparam",
        **kwargs,
    ):
        if encoder_objective not in ("miwae", "elbo"):
            raise ValueError(
                f"unknown encoder_objective {encoder_objective!r}; choose 'miwae' or 'elbo'"
            )
        self.encoder_objective = encoder_objective
        super().__init__(num_outer, num_inner, estimator, **kwargs)

    def model_terms(self):
        return [(self.num_particles, 1.0)]

    def guide_terms(self):
        return [(self.num_inner if self.encoder_objective == "miwae" else 1, 1.0)]
