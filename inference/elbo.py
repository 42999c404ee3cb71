"""The evidence lower bound with beta, KL annealing and free bits.

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))

Per latent site the KL is analytic where ``torch.distributions.kl_divergence`` has the pair
registered (unwrapping ``Independent``), otherwise the Monte-Carlo estimate
log q(z | x) - log p(z). The training objective may weight it:

    loss = -(E_q[log p(x | z)] - beta(step) * sum_d max(free_bits, E_batch KL_d))

- beta-VAE: Higgins et al. 2017; KL annealing: Bowman et al. 2016 (linear warm-up) and Fu et
  al. 2019 (cyclical schedule); free bits: Kingma et al. 2016, per latent dimension and
  averaged over the minibatch.

An observed site that declares its closed-form expectation under the guide
(``infer={"expected_log_prob": ...}``, :func:`pvae.protocol.expected_log_prob`) contributes
that expectation in place of ``log p(x | z)`` at the draw: the same bound in expectation,
without that term's Monte-Carlo noise. Other engines ignore the declaration.

The reported bound is always the plain ELBO (beta = 1, no free bits), so numbers from runs with
different schedules stay comparable. Per-datapoint terms count N/B times, global ones once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pvae.kl import kl_elements
from pvae.protocol import (
    check_reparameterized,
    declares_monte_carlo_kl,
    detach_distribution,
    expected_log_prob,
    latent_sites,
)
from pvae.steps import attribute_settings
from pvae.validation import finite_float, non_negative_int, positive_int

from .base import Engine

Schedule = Callable[[int], float]


@dataclass(frozen=True)
class LinearAnnealing:
    """beta rises linearly from ``start`` to ``end`` over ``num_steps`` steps, then stays."""

    num_steps: int
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        non_negative_int(self.num_steps, "num_steps")
        finite_float(self.start, "start", minimum=0.0)
        finite_float(self.end, "end", minimum=0.0)

    def __call__(self, step: int) -> float:
        fraction = min(1.0, step / max(1, self.num_steps))
        return self.start + (self.end - self.start) * fraction


@dataclass(frozen=True)
class CyclicalAnnealing:
    """Fu et al. 2019: in each period of ``period`` steps beta rises linearly from ``start`` to
    ``end`` during the first ``ratio * period`` steps and then holds at ``end``."""

    period: int
    ratio: float = 0.5
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        positive_int(self.period, "period")
        finite_float(self.ratio, "ratio", minimum=0.0, maximum=1.0)
        finite_float(self.start, "start", minimum=0.0)
        finite_float(self.end, "end", minimum=0.0)

    def __call__(self, step: int) -> float:
        phase = (step % self.period) / self.period
        fraction = min(1.0, phase / self.ratio) if self.ratio > 0 else 1.0
        return self.start + (self.end - self.start) * fraction


def _with_stl_gradient(elements, guide_site: dict, model_site: dict, event_dims: int):
    """``elements``' value with the STL gradient: that of log q(z) - log p(z) with the
    guide's parameters detached inside q, per element (the ``Independent`` wrappers of
    :meth:`ELBO._kl_elements` removed the same way)."""
    q, p = detach_distribution(guide_site["fn"]), model_site["fn"]
    removed = 0
    while removed < event_dims:
        removed += q.reinterpreted_batch_ndims
        q, p = q.base_dist, p.base_dist
    z = guide_site["value"]
    stl = q.log_prob(z) - p.log_prob(z)
    return elements.detach() + (stl - stl.detach())


class ELBO(Engine):
    """Evidence lower bound, usable in ``pyro.infer.SVI`` and ``pvae.fit``.

    :param num_particles: samples of z per datapoint (averaged).
    :param beta: weight of the KL term: a float, or a schedule ``step -> beta`` such as
        :class:`LinearAnnealing` or :class:`CyclicalAnnealing`.
    :param free_bits: nats per latent dimension below which the KL is not pushed down
        (``max(free_bits, E_batch KL_d)``); 0 disables it.
    :param analytic_kl: use closed-form KLs where registered.
    :param estimator: the guide's gradient. ``"reparam"`` differentiates the bound as it is
        computed (analytic KL included). ``"stl"`` (sticking the landing, Roeder et al. 2017)
        differentiates log p(x, z) - log q(z | x) with the guide's parameters detached inside
        log q, so only the path through z carries gradient: unbiased for the ELBO and of zero
        variance at the exact posterior. An analytic KL would differentiate q's parameters
        directly, so under STL each KL term keeps its value (the reported bound and the
        loss are unchanged) and takes its gradient from the STL estimate
        log q_detached(z) - log p(z).
    :param vectorize_particles: draw the particles in one vectorised run of the pair (the
        default) or one per run, in a loop, for pairs that cannot be vectorised (see
        :class:`~pvae.inference.Engine`).
    :param max_plate_nesting: the pair's deepest plate nesting; guessed from a first run when
        omitted.
    :param data_plate: the name of the plate holding the datapoints (``"data"``).
    :param fast: after the first step of a pair (traced and checked as always), run the guide
        and the model under one light recorder each instead of ``poutine.trace`` and
        ``poutine.replay`` (see :meth:`~pvae.inference.Engine.traces`): the same site
        messages, so the same loss, bound and gradients, with the structural checks redone
        whenever a site, shape, plate, scale, mask or distribution type differs from the last
        draw checked. ``False`` traces every step. Not a setting: it changes no number.
    """

    estimators = ("reparam", "stl")

    def __init__(
        self,
        num_particles: int = 1,
        beta: float | Schedule = 1.0,
        free_bits: float = 0.0,
        analytic_kl: bool = True,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        estimator: str = "reparam",
        data_plate: str = "data",
        fast: bool = True,
    ):
        super().__init__(num_particles, vectorize_particles, max_plate_nesting, data_plate)
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False, got {fast!r}")
        self.fast = fast
        if estimator not in self.estimators:
            raise ValueError(
                f"unknown estimator {estimator!r} for the ELBO; choose one of {self.estimators} "
                "(DReG of the ELBO is STL)"
            )
        self.estimator = estimator
        if not callable(beta):
            beta = finite_float(beta, "beta", minimum=0.0)
        free_bits = finite_float(free_bits, "free_bits", minimum=0.0)
        self.beta = beta
        self.free_bits = float(free_bits)
        self.analytic_kl = analytic_kl
        self._warned_order = False
        self._order_pair: tuple[Any, Any] | None = None  # for declares_monte_carlo_kl

    def settings(self) -> dict[str, Any]:
        """``num_particles``, ``estimator``, ``free_bits``, ``analytic_kl`` and ``beta`` (a
        schedule by its ``repr`` when it is a frozen dataclass, such as
        :class:`LinearAnnealing`)."""
        names = ("estimator", "free_bits", "analytic_kl", "beta")
        return {**super().settings(), **attribute_settings(self, *names)}

    def current_beta(self) -> float:
        """The KL weight used at the current step."""
        if not callable(self.beta):
            return float(self.beta)
        beta = float(self.beta(self.step))
        if not beta >= 0.0 or beta == float("inf"):  # NaN fails the comparison
            raise ValueError(
                f"the beta schedule {self.beta!r} gave beta = {beta} at step {self.step}; "
                "beta must be a finite number >= 0"
            )
        return beta

    def _kl_elements(self, guide_site: dict, model_site: dict, analytic: bool):
        """KL(q || p) of one site, with per-dimension elements (:func:`pvae.kl.kl_elements`)."""
        return kl_elements(guide_site["fn"], model_site["fn"], guide_site["value"], analytic)

    def _analytic_allowed(self, model_trace, guide_trace) -> bool:
        """Analytic KLs need the model and the guide to sample latents in the same order."""
        if not self.analytic_kl:
            return False
        guide_order = [n for n, _, _ in latent_sites(model_trace, guide_trace)]
        model_order = [n for n in model_trace.nodes if n in set(guide_order)]
        if guide_order != model_order:
            declared = self._order_pair is not None and declares_monte_carlo_kl(
                *self._order_pair
            )  # read only here: the warning is its only use
            if not self._warned_order and not declared:
                warnings.warn(
                    "model and guide sample their latents in different orders "
                    f"({model_order} vs {guide_order}); using Monte-Carlo KL estimates",
                    stacklevel=3,
                )
                self._warned_order = True
            return False
        return True

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_order_pair"] = None
        return state

    def objective(self, model, guide, args, kwargs):
        self._order_pair = (model, guide)
        beta = self.current_beta()
        plain = beta == 1.0 and self.free_bits == 0  # then the loss is the negative bound
        bound: torch.Tensor | float = 0.0
        loss: torch.Tensor | float = 0.0
        draws = self.particles(model, guide, args, kwargs, self.num_particles)
        weight = 1.0 / len(draws)
        for model_trace, guide_trace, reduce in draws:
            check_reparameterized(guide_trace, "ELBO")
            scale, batch = reduce.data_scale, reduce.batch_size

            def total(term, local, _scale=scale):
                """Full-data value of a reduced (K', B', D) term, averaged over particles."""
                if term.shape[0] == 1:  # one particle: the mean over it is the identity
                    value = term.sum() if term.shape[-1] == 1 else term.sum(-1).sum()
                else:
                    value = term.sum(-1).mean(0).sum()
                return _scale * value if local else value

            log_lik: torch.Tensor | float = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"]:
                    expected = expected_log_prob(site)  # a declared closed form, ELBO-only
                    if expected is None:
                        expected = site["fn"].log_prob(site["value"])
                    term = reduce(expected, site)
                    log_lik = _add(log_lik, total(term, reduce.is_local(site)))
            kl: torch.Tensor | float = 0.0
            kl_objective: torch.Tensor | float = 0.0
            analytic = self._analytic_allowed(model_trace, guide_trace)
            for _, guide_site, model_site in latent_sites(model_trace, guide_trace):
                elements, event_dims = self._kl_elements(guide_site, model_site, analytic)
                if self.estimator == "stl":
                    elements = _with_stl_gradient(elements, guide_site, model_site, event_dims)
                term = reduce(elements, guide_site, event_dims)  # (K', B', D)
                local = reduce.is_local(guide_site)
                kl = _add(kl, total(term, local))
                if self.free_bits > 0:
                    per_dim = term.mean(0).mean(0).clamp(min=self.free_bits).sum()
                    kl_objective = kl_objective + (scale * batch * per_dim if local else per_dim)
            value = log_lik - kl
            if len(draws) == 1:  # no averaging: the same numbers, fewer ops
                bound = value
                if plain:
                    loss = -value
                else:
                    kl_objective = kl_objective if self.free_bits > 0 else kl
                    loss = -(log_lik - beta * kl_objective)
                continue
            bound = bound + weight * value
            if plain:
                loss = loss - weight * value
            else:
                kl_objective = kl_objective if self.free_bits > 0 else kl
                loss = loss - weight * (log_lik - beta * kl_objective)
        self._order_pair = None  # not kept alive by the engine
        return torch.as_tensor(loss), torch.as_tensor(bound).detach()


def _add(total, term):
    """``total + term``, with no addition while ``total`` is still the initial 0.0."""
    return term if isinstance(total, float) and total == 0.0 else total + term
