"""Stochastic-gradient Hamiltonian Monte Carlo: a sampler engine.

SGHMC (Chen, Fox and Guestrin 2014) simulates Hamiltonian dynamics with friction on the
potential U(theta) = -log p(x, theta), estimated on a minibatch (per-datapoint terms counted
N/B times, global terms once: the *full-data* potential estimate). In Chen et al.'s
"(eta, alpha)" parametrisation, with v the velocity,

    v     <- v - eta * grad U(theta) - alpha * v + N(0, 2 * (alpha - beta_hat) * eta)
    theta <- theta + v

where eta is the learning rate, alpha the friction (1 - alpha is the momentum decay per step)
and beta_hat = eta * V_hat / 2 an estimate of the noise that the minibatch gradient itself
injects (V_hat its variance); the injected noise makes up the rest, so that the chain's
stationary distribution is exp(-U) up to an O(eta) discretisation bias.

The adaptive variant (Springenberg, Klein, Falkner and Hutter 2016, "Bayesian optimization
with robust Bayesian neural networks"; the default) preconditions every coordinate i by a
diagonal mass: eta_i = eta * M_i^{-1} with M_i^{-1} = 1 / sqrt(v_hat_i), v_hat_i a running
average of the squared gradient, estimated during warm-up with their adaptive window
(tau <- tau * (1 - g_bar^2 / v_hat) + 1, averages with weight 1 / (tau + 1)). The friction
C = alpha * M / sqrt(eta) of their formulation is thereby estimated with the mass (they fix the
momentum decay alpha = M^{-1} C sqrt(eta), their "mdecay"), and the gradient noise V_hat_i =
v_hat_i - g_bar_i^2 is estimated from the same averages. After warm-up the preconditioner and
the noise estimate are frozen, so the sampling phase is a time-homogeneous Markov chain.

Step size and the N/B scale: the potential here is already the full-data estimate, so the
gradient is never multiplied by N again. The learning rate follows Springenberg et al.'s scaled
parametrisation: ``lr`` is given per datapoint and the step is ``eta = lr / N`` (N the number
of datapoints, 1 for a model without data). Since the potential's curvature grows like N, this
keeps the dynamics' frequency per step, sqrt(eta * curvature), and the share of minibatch noise,
eta * V / (2 alpha), of the same order whatever N; the defaults (``lr=0.05``,
``friction=0.05``) sample a well-conditioned Bayesian linear regression without tuning.

The state: every latent site of the model, in unconstrained space (``biject_to(support)``, as
Pyro's MCMC does; the log-abs-det Jacobian joins the log joint), including ``PyroSample``
attributes of ``PyroModule`` instances. Per-datapoint latent sites (inside
``pyro.plate("data")``) are refused when the data are minibatched: this first version keeps no
full state table indexed by the batch's rows; with ``batch_size >= N`` (every datapoint in
every step) they are sampled like any other site.

Use through :func:`pvae.sample`, which scales the model to the data and runs warm-up, sampling,
thinning, chains and checkpoints. By hand::

    sampler = SGHMC()
    model = pvae.scale_to_data(model, N)
    sampler.setup(model, first_batch, num_data=N, num_warmup=1000, seed=0)
    for batch in batches:
        record = sampler.train_step(model, None, *batch)   # a StepRecord with log_joint
        values = sampler.values()                            # constrained, detached
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, transforms

from pvae.protocol import DATA_PLATE, find_data_frame
from pvae.steps import StepRecord
from pvae.validation import finite_float, seed_value

__all__ = ["SGHMC"]

_EPS = 1e-8  # added to v_hat before its square root: a coordinate with no gradient stays finite


class _LogJoint(Messenger):
    """Runs a model at given latent values and sums the log density of every sample site.

    Latent sites named in ``values`` take those values (as ``poutine.condition`` does); every
    sample site, observed or latent, adds ``log_prob(value)`` times its scale and mask (the
    data plate's N/B included, read from the site's final scale), subsample sites excepted.
    Lighter than ``poutine.trace`` + ``Trace.log_prob_sum``: no trace is built.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.total: torch.Tensor | None = None  # the first term starts the sum: no 0.0 + ...
        self.seen: set[str] = set()

    def _pyro_sample(self, msg: Any) -> None:
        name = msg["name"]
        if name in self.values:
            msg["value"] = self.values[name]
            msg["is_observed"] = True
            self.seen.add(name)

    def _postprocess_message(self, msg: Any) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        log_prob = msg["fn"].log_prob(msg["value"])
        term = scale_and_mask(log_prob, msg["scale"], msg["mask"]).sum()
        self.total = term if self.total is None else self.total + term


def _latent_sites(model: Callable, args: tuple, kwargs: dict) -> Any:
    """The model's trace on one batch (no gradients, Pyro's random state kept)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return pyro.poutine.trace(model).get_trace(*args, **kwargs)


class SGHMC:
    """Stochastic-gradient HMC over every latent site of a Pyro model (a sampler engine).

    :param lr: the learning rate per datapoint: each step uses ``eta = lr / N`` (N datapoints;
        1 without data), times the preconditioner ``1 / sqrt(v_hat)`` when ``adaptive``.
    :param friction: alpha, the share of the velocity lost per step (Springenberg et al.'s
        "mdecay"), in (0, 1].
    :param adaptive: estimate the diagonal preconditioner and the gradient-noise term during
        warm-up (Springenberg et al. 2016); False: plain SGHMC (Chen et al. 2014) with an
        identity mass and beta_hat = 0.
    :param init_radius: initial unconstrained values are drawn uniformly from
        ``(-init_radius, init_radius)`` (Pyro's ``init_to_uniform``).

    State (``state_dict``): the unconstrained values and velocities of every site, the
    preconditioner's averages (``g_bar``, ``v_hat``, ``tau``), the step counter and the random
    generator of the injected noise. Every step returns a :class:`pvae.steps.StepRecord` with
    ``log_joint`` = the minibatch estimate of log p(x, theta) in unconstrained space (Jacobian
    included) at the state where the gradient was taken, and ``loss = -log_joint`` (the
    potential U).
    """

    def __init__(
        self,
        lr: float = 0.05,
        friction: float = 0.05,
        adaptive: bool = True,
        init_radius: float = 2.0,
    ):
        self.lr = finite_float(lr, "lr", minimum=0.0)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.friction = finite_float(friction, "friction", minimum=0.0, maximum=1.0)
        if self.friction <= 0:
            raise ValueError(f"friction must be in (0, 1], got {friction!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {adaptive!r}")
        self.adaptive = adaptive
        self.init_radius = finite_float(init_radius, "init_radius", minimum=0.0)
        self.reset()

    # -- set-up ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the chain: :meth:`setup` must run again before the next step."""
        self.names: list[str] = []
        self.transforms: list[Any] = []
        self._maps: list[Any] = []  # the transforms, None for the identity
        self.shapes: dict[str, torch.Size] = {}
        self.theta: list[torch.Tensor] = []  # unconstrained values, leaves requiring grad
        self.velocity: list[torch.Tensor] = []
        self.g_bar: list[torch.Tensor] = []
        self.v_hat: list[torch.Tensor] = []
        self.tau: list[torch.Tensor] = []
        self.step_count = 0
        self.num_warmup = 0
        self.num_data = 1
        self.stochastic = False
        self.generator = torch.Generator()
        self._eta: list[torch.Tensor | float] = []
        self._noise: list[torch.Tensor | float] = []

    def setup(
        self,
        model: Callable,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        num_data: int = 1,
        num_warmup: int = 0,
        seed: int = 0,
    ) -> None:
        """Start a chain: find the model's latent sites on one batch (``args``), draw their
        initial unconstrained values, zero the velocities.

        :param model: the model as it will be stepped (already scaled to the data with
            :func:`pvae.scale_to_data` when fed minibatches).
        :param num_data: N, the number of datapoints (the step is ``lr / N``).
        :param num_warmup: steps during which the preconditioner and noise are estimated.
        :param seed: seeds this chain's generator (initial values and injected noise).
        :raises ValueError: the model has no latent site, or a per-datapoint latent site while
            the batch holds fewer than N rows.
        """
        self.reset()
        self.num_data = max(1, int(num_data))
        self.num_warmup = int(num_warmup)
        self.generator.manual_seed(seed_value(seed))
        trace = _latent_sites(model, args, dict(kwargs or {}))
        frame = find_data_frame(trace)
        batch = frame.size if frame is not None else self.num_data
        self.stochastic = frame is not None and batch < self.num_data
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if self.stochastic and any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
                raise ValueError(
                    f"latent site {name!r} is inside pyro.plate('data'): a per-datapoint "
                    f"latent, which SGHMC samples only when every step sees all {self.num_data} "
                    f"datapoints (batch_size >= N; the batch has {batch}). Minibatched "
                    "per-datapoint latents are not supported in this version"
                )
            transform = biject_to(site["fn"].support)
            value = site["value"].detach()
            unconstrained = transform.inv(value)
            start = torch.rand(
                unconstrained.shape, generator=self.generator, dtype=unconstrained.dtype
            )
            start = (2 * start - 1) * self.init_radius
            self.names.append(name)
            self.transforms.append(transform)
            self._maps.append(None if _is_identity(transform) else transform)
            self.shapes[name] = value.shape
            self.theta.append(start.to(unconstrained.device).requires_grad_(True))
        if not self.names:
            raise ValueError(
                "the model has no latent sample site (every site is observed); there is "
                "nothing to sample"
            )
        self.velocity = [torch.zeros_like(t) for t in self.theta]
        self.g_bar = [torch.zeros_like(t) for t in self.theta]
        self.v_hat = [torch.zeros_like(t) for t in self.theta]
        self.tau = [torch.ones_like(t) for t in self.theta]
        self._frozen()

    @property
    def adapting(self) -> bool:
        """Whether this step still estimates the preconditioner (warm-up, adaptive only)."""
        return self.adaptive and self.step_count < self.num_warmup

    def _frozen(self) -> None:
        """Per-coordinate step eta_i and injected-noise std, from the current estimates."""
        eta = self.lr / self.num_data
        alpha = self.friction
        self._eta, self._noise = [], []
        for g_bar, v_hat in zip(self.g_bar, self.v_hat, strict=True):
            if not self.adaptive or not bool((v_hat > 0).any()):
                self._eta.append(eta)
                self._noise.append(math.sqrt(2 * alpha * eta))
                continue
            eta_i = eta * (v_hat + _EPS).rsqrt()
            if self.stochastic:  # beta_hat = eta V_hat / 2, V_hat the minibatch noise
                beta = 0.5 * eta_i * (v_hat - g_bar.square()).clamp(min=0.0)
                variance = (2 * (alpha - beta) * eta_i).clamp(min=0.0)
            else:
                variance = 2 * alpha * eta_i
            self._eta.append(eta_i)
            self._noise.append(variance.sqrt())

    # -- one step -------------------------------------------------------------------------------
    def unconstrained(self) -> dict[str, torch.Tensor]:
        """The chain's current unconstrained values by site name (detached)."""
        return {name: t.detach() for name, t in zip(self.names, self.theta, strict=True)}

    def values(self) -> dict[str, torch.Tensor]:
        """The chain's current values by site name, in each site's support (detached)."""
        with torch.no_grad():
            return {
                name: transform(t).detach()
                for name, transform, t in zip(self.names, self.transforms, self.theta, strict=True)
            }

    def log_joint(self, model: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """log p(x, theta) in unconstrained space at the current state (Jacobian included),
        differentiable with respect to the state."""
        values: dict[str, torch.Tensor] = {}
        jacobian: torch.Tensor | None = None  # None: every site unconstrained, no term to add
        for name, transform, t in zip(self.names, self._maps, self.theta, strict=True):
            if transform is None:  # real support: the identity, no Jacobian
                values[name] = t
                continue
            value = transform(t)
            values[name] = value
            term = transform.log_abs_det_jacobian(t, value).sum()
            jacobian = term if jacobian is None else jacobian + term
        messenger = _LogJoint(values)
        with messenger:
            model(*args, **kwargs)
        if len(messenger.seen) != len(values):
            missing = sorted(set(values) - messenger.seen)
            raise ValueError(
                f"the model did not sample latent sites {missing} on this batch; SGHMC needs "
                "the same latent sites at every step"
            )
        total = messenger.total
        if total is None:  # no sample site ran: the setup's check makes this unreachable
            raise ValueError("the model ran no sample site")
        return total if jacobian is None else total + jacobian

    def train_step(
        self, model: Callable, guide: Any = None, *args: Any, **kwargs: Any
    ) -> StepRecord:
        """Move the chain one step on the batch ``args``; return its record.

        ``guide`` is unused (a sampler has none; pass None), so that the signature is the one
        of every pvae engine (:class:`pvae.steps.StepEngine`).
        """
        if not self.theta:
            raise RuntimeError("SGHMC.setup(model, args, ...) must run before the first step")
        log_joint = self.log_joint(model, *args, **kwargs)
        grads = torch.autograd.grad(log_joint, self.theta)  # -grad U
        adapting = self.adapting
        alpha = self.friction
        with torch.no_grad():
            if adapting:
                for g, g_bar, v_hat, tau in zip(
                    grads, self.g_bar, self.v_hat, self.tau, strict=True
                ):
                    if self.step_count == 0:
                        g_bar.copy_(g)
                        v_hat.copy_(g.square())
                        continue
                    r = (tau + 1).reciprocal()
                    g_bar.mul_(1 - r).addcmul_(r, g)
                    v_hat.mul_(1 - r).addcmul_(r, g.square())
                    tau.mul_(1 - g_bar.square() / (v_hat + _EPS)).add_(1)
                self._frozen()
            for theta, v, g, eta, noise in zip(
                self.theta, self.velocity, grads, self._eta, self._noise, strict=True
            ):
                draw = torch.randn(v.shape, generator=self.generator, dtype=v.dtype)
                v.mul_(1 - alpha).add_(g * eta).add_(draw.to(v.device) * noise)
                theta.add_(v)
        self.step_count += 1
        value = float(log_joint.detach())
        return StepRecord(loss=-value, bound=None, log_joint=value)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue the chain exactly."""
        return {
            "names": list(self.names),
            "theta": [t.detach().clone() for t in self.theta],
            "velocity": [t.clone() for t in self.velocity],
            "g_bar": [t.clone() for t in self.g_bar],
            "v_hat": [t.clone() for t in self.v_hat],
            "tau": [t.clone() for t in self.tau],
            "step_count": self.step_count,
            "num_warmup": self.num_warmup,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a chain set up on the same model."""
        if list(state["names"]) != self.names:
            raise ValueError(
                f"the SGHMC state holds sites {list(state['names'])}, the model has {self.names}"
            )
        with torch.no_grad():
            for key in ("theta", "velocity", "g_bar", "v_hat", "tau"):
                for mine, saved in zip(getattr(self, key), state[key], strict=True):
                    mine.copy_(saved)
        self.step_count = int(state["step_count"])
        self.num_warmup = int(state["num_warmup"])
        self.generator.set_state(state["generator"])
        self._frozen()


def _is_identity(transform: Any) -> bool:
    """Whether ``transform`` (from ``biject_to``) is the identity, possibly made independent."""
    while isinstance(transform, transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, transforms.ComposeTransform) and not transform.parts
