"""Stochastic-gradient Hamiltonian Monte Carlo: a sampler engine.

SGHMC (Chen, Fox and Guestrin 2014) simulates Hamiltonian dynamics with friction on the
potential U(theta) = -log p(x, theta), estimated on a minibatch (per-datapoint terms counted
N/B times, global terms once: the *full-data* potential estimate). In Chen et al.'s
"(eta, alpha)" parametrisation, with v the velocity,

    v     <- (1 - alpha) * v - eta * grad U(theta) + N(0, 2 * alpha * eta - eta^2 * V_hat)
    theta <- theta + v

where eta is the step (per coordinate: eta_i = eta * P_i with P a diagonal preconditioner, the
inverse mass), alpha the friction (the share of the velocity lost per step) and V_hat an
estimate of the variance that the minibatch gradient itself injects. The chain's stationary
distribution is exp(-U) up to an O(eta) discretisation bias and the part of the minibatch
noise that is not compensated.

The minibatch noise does not stay small as N grows. The gradient of the full-data estimate has
a variance V of about (N / B) times the potential's curvature (for a well-specified model), so
the share of noise that the dynamics receive, eta * V / (2 alpha), grows like eta * N / B for a
fixed step in the posterior's own units: a plain sampler with a fixed step over-estimates the
posterior variance by about that factor. The adaptive sampler therefore sets its step from the
measured gradient variance (below).

The adaptive sampler (the default) spends its warm-up in three parts, all inside ``num_warmup``
steps, then freezes everything, so that the sampling phase is a time-homogeneous Markov chain:

1. *Start near the mode.* From each chain's initial draw (uniform in
   ``(-init_radius, init_radius)`` in unconstrained space) a short stochastic optimisation of
   the log joint (Adam, with a step decaying from 0.1 to 0.001) takes the first sixth of the
   warm-up, so that the chain does not spend its warm-up crossing tens of posterior standard
   deviations. Its squared-gradient average gives the first preconditioner.
2. *Windowed adaptation* (as Stan's expanding windows): the rest of the warm-up is cut into
   windows of 50, 100, 200, ... steps (the last one takes what remains). At the end of every
   window the preconditioner P_i becomes the window's sample variance of theta_i (shrunk towards
   1e-3 as Stan does), and V_hat_i the window's variance of the gradient. Each window starts
   from the estimates of the one before, so the transient's estimates are discarded.
3. *The step.* Under minibatches (a batch of B < N datapoints), the step is the largest that
   keeps the minibatch-noise share small in every coordinate:
   ``eta = min(lr, 2 * alpha * c / max_i(P_i * V_hat_i))`` with c = 2; it shrinks like B / N.
   Minibatches are a random reshuffling per epoch, whose noise sums to zero over an epoch and
   so heats the slow dynamics far less than white noise of the same variance would: a fixed
   share (0.15) of ``eta_i^2 * V_hat_i`` is removed from the injected noise. When every step
   sees all the data (``batch_size >= N``, or a model without data) there is no minibatch
   noise: no such bound and no noise removed. The window's gradient variance then holds only
   the gradient's variation along the chain's path, and ``P_i * V_hat_i`` is a curvature: for
   a stationary chain on a quadratic it is ``(P^1/2 H P^1/2)_ii`` (H the curvature; P_i V_i >=
   1 by Stein's identity Cov(theta_i, d_i log p) = -1 and Cauchy-Schwarz), at most lambda_max
   below; a larger value says the gradient moved more along the path than the curvature at
   the window's end explains (a drifting or non-quadratic window), and it is kept as the
   curvature estimate then.
   The step must also stay stable for coupled coordinates (on a quadratic this
   discretisation is stable iff ``eta * lambda_max(P^1/2 H P^1/2) < 2 (2 - alpha)``),
   notably when a window was estimated while the chain still drifted: a 784-100-10 Bayesian
   autoencoder's log joint fell from -7e4 to -1.6e6 three steps after its first window
   closed. So at the optimisation's end and at every window close lambda_max is measured
   (power iteration with finite-difference Hessian-vector products, 12 gradients) and the
   step is capped at ``2 / lambda_max`` (under full batches ``2 / max(lambda_max, max_i P_i
   V_hat_i)``). The full-batch step is thus ``min(lr, 2 / max(lambda_max, max_i P_i
   V_hat_i))``: the former rule, which also bounded a non-existent minibatch noise there,
   gave up to 1.7 times less on a stationary quadratic and far less on a drifting window.
   This cap, not ``lr``, sets the step of a Bayesian autoencoder's chains (784-100-10,
   100-500 images: ``lambda_max`` 300-17,000 after the last window, the step 1e-4 to 6e-3).
4. *The friction.* The update is a discretisation of underdamped Langevin dynamics with time
   step ``sqrt(eta)`` and friction ``alpha / sqrt(eta)`` per unit time. ``friction`` is the
   friction per step at the step the noise bound and ``lr`` allow; when the curvature cap
   shortens the step below that, the friction per step becomes ``friction * sqrt(step /
   uncapped step)`` (``alpha`` below), so that the chain simulates the same dynamics more
   finely instead of an overdamped random walk whose per-step friction, fixed while the step
   fell 10-100 times, made its relaxation time in steps grow like ``friction / (eta *
   lambda)``. A Bayesian autoencoder (200 images, prior 0.1, 4 chains of 1,200 steps) showed
   it: its weights were under-preconditioned (P_i 2-8 times below the prior variance, which is
   each weight's conditional variance there: the likelihood's share of the Hessian diagonal is
   nil for most weights) and fixed per-step friction 0.3 left the chains at levels 26
   within-chain sds apart (R-hat 3.6); this rule brought them within 7 sds (R-hat 2.3), and
   with ``friction=0.1`` within 0.8 (R-hat 1.14; the windows' variances then reach 0.6-1 times
   the prior variance; see ``benchmarks/papers/bae.py``). Where the cap does not bind (every
   conjugate problem below) nothing changes. The default ``friction`` stays 0.3: 0.1 was
   checked on two of those problems only (seed 0: the minibatch rho = 0.5 one, R-hat 1.025 and
   bulk ESS 176; the full-batch rho = 0.8 one, 1.010 and 353 against 0.3's 1.026 and 236).

Measured on three conjugate Bayesian linear regressions (N = 400 to 1000, d = 3 to 5, batches
of 50 or 100, equicorrelated features included), seeds 0-3, with the defaults (4 chains, 1000
warm-up steps, 1000 draws): R-hat at most 1.031, bulk ESS at least 183, posterior sds within
8% and means within 0.14 posterior sd of the exact ones; see
``tests/inference/test_sghmc_defaults.py`` and ``benchmarks/sghmc_conjugate.py``. On full
batches (N = 1000, d = 5, equicorrelated features rho = 0.8, seed 0): R-hat 1.026, bulk ESS
235, sds within 6%, means within 0.15 sd, the step at ``lr`` (``lambda_max`` 21).
A known failure: on full batches with feature scales spanning 100x (N = 1000, d = 5,
posterior sds 3e-2 to 3e-4), each window's shrinkage towards an absolute 1e-3 leaves the
stiffest weight's P_i about 100 times its posterior variance, ``lambda_max`` about 100 caps the
step and the loosest weights barely move (seeds 0-3: R-hat 1.12-1.77, bulk ESS 6-36; a strict
xfail in ``tests/inference/test_sghmc_defaults.py``). Shrinking towards 1 / E[g_i^2] instead
fixed two seeds of four, and on a Bayesian autoencoder raising P_i to that bound made the
coupled ``lambda_max`` six times larger: neither was kept. Nor were three scale-free rules
for the full-batch window (``benchmarks/papers/results/bae/preconditioner_probe.json``):
``sqrt(Var theta_i / Var g_i)`` (the posterior variance on a diagonal quadratic along any
path) fixed this regression on seeds 0-3 (R-hat <= 1.021, ESS >= 270) but halved the ESS of
the rho = 0.8 one (235 to 68, seed 0); the larger of it and the window variance passed both, but a
Bayesian autoencoder's chains (200 and 500 images) then exploded a few steps after a window
closed at every ``lr`` tried (0.05, 0.02, 0.008: the step was set by ``lambda_max``, not
``lr``); capping it at 4 times the window variance kept those chains finite but brought back
this regression's failure (R-hat 1.49, ESS 8). The friction rule (4. above) does not fix it
either (seed 0: R-hat 1.30, ESS 11; with ``friction=0.05``, 1.25 and 27): here the step, not the
friction, is what the over-sized P of the stiffest weight wastes.

The plain sampler (``adaptive=False``; Chen et al. 2014) uses an identity mass, the step
``eta = lr / N`` (``lr`` per datapoint, N the number of datapoints, 1 without data) and no
noise estimate. It is exact up to the discretisation bias (about ``lr * I / 4`` of the
variance, I the per-datapoint Fisher information) when every step sees all the data
(``batch_size >= N``); under minibatches it over-estimates the posterior variance by a factor
of about ``1 + lr * I * N / (2 * friction * B)``, so keep ``lr * N / B`` well below
``friction / I`` there.

The log joint is evaluated by a fast potential (``fast=True``, :mod:`pvae.potential`): at
:meth:`SGHMC.setup` the model's sites are learned from one trace, and every step then runs the
model under one light handler that substitutes the state and sums the log densities, with the
Normal priors of fixed ``PyroSample`` attributes (the zoo's ``BayesianAE``) in closed form
(one dot product and one fused backward product per weight tensor) and the data plate's N/B
applied once to the summed likelihood. It is checked against the traced log joint (value and
gradient) at setup and left off, with a warning, if they differ; a structure change (another
site sequence, a prior replaced) is detected on every step by comparing site names and
distribution objects (no tensor work), that step's sites fall back to their own ``log_prob``
and the structure is learned again. The fast and the plain potentials agree to rounding, not
bit for bit: see ``tests/inference/test_sghmc_potential.py``.

Divergence: a chain whose log joint becomes NaN or infinite, or falls more than 100 times its
best value's magnitude (plus the dimension) below that best value (a state that has exploded
while staying finite), raises :class:`pvae.SamplingDiverged`.

The state: every latent site of the model, in unconstrained space (``biject_to(support)``, as
Pyro's MCMC does; the log-abs-det Jacobian joins the log joint), including ``PyroSample``
attributes of ``PyroModule`` instances. Discrete latent sites are refused (marginalise them or
use a continuous relaxation), and so is a latent site that the model samples only after
:meth:`SGHMC.setup` (it would be drawn from its prior at every step). Per-datapoint latent sites
(inside ``pyro.plate("data")``) are refused when the data are minibatched: this first version
keeps no full state table indexed by the batch's rows; with ``batch_size >= N`` (every
datapoint in every step) they are sampled like any other site.

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
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, transforms

from pvae.checkpoint import rng_state, set_rng_state
from pvae.potential import FastLogJoint, Potential
from pvae.protocol import find_data_frame
from pvae.sampling import SamplingDiverged
from pvae.steps import SamplerEngine, StepRecord, attribute_settings
from pvae.validation import finite_float, plate_name, seed_value

__all__ = ["SGHMC"]

_EPS = 1e-8  # added to variances before they divide: a coordinate with no gradient stays finite
_NOISE_SHARE = 2.0  # c: the largest minibatch-noise share eta * P_i * V_i / (2 alpha)
_COMPENSATE = 0.15  # the share of eta_i^2 V_i removed from the injected noise (reshuffled batches)
_INIT_SHARE = 6  # the start-near-the-mode optimisation takes num_warmup // 6 steps
_FIRST_WINDOW = 50  # the first adaptation window; each next one doubles
_ADAM_LR = (0.1, 0.001)  # the optimiser's step, decaying geometrically from the first to the second
_ADAM_BETAS = (0.9, 0.999)
_BLOWUP = 100.0  # a log joint this many times its best magnitude below the best: diverged
_FLOOR = 0.01  # the first preconditioner's gradient terms: floored at this share of their mean
_STABLE = 2.0  # eta * lambda_max(P^1/2 H P^1/2) at most this (stable below 2 (2 - friction))
_POWER_STEPS = 12  # power iterations for lambda_max at each window close
_PROBE = 0.01  # the finite-difference probe: this share of the posterior sds' norm

_STATE_KEYS = (
    "names",
    "theta",
    "velocity",
    "adam_m",
    "adam_v",
    "precond",
    "grad_var",
    "window",
    "secant",
    "step_size",
    "adapted",
    "best",
    "step_count",
    "num_warmup",
    "generator",
)


class _LogJoint(Messenger):
    """Runs a model at given latent values and sums the log density of every sample site.

    Latent sites named in ``values`` take those values (as ``poutine.condition`` does); every
    sample site, observed or latent, adds ``log_prob(value)`` times its scale and mask (the
    data plate's N/B included, read from the site's final scale), subsample sites excepted.
    A latent site not in ``values`` is recorded in ``unknown`` (the caller refuses it).
    Lighter than ``poutine.trace`` + ``Trace.log_prob_sum``: no trace is built.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.total: torch.Tensor | None = None  # the first term starts the sum: no 0.0 + ...
        self.seen: set[str] = set()
        self.unknown: list[str] = []

    def _pyro_sample(self, msg: Any) -> None:
        name = msg["name"]
        if name in self.values:
            msg["value"] = self.values[name]
            msg["is_observed"] = True
            self.seen.add(name)
        elif not msg["is_observed"] and not site_is_subsample(msg):
            self.unknown.append(name)

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


def warmup_schedule(num_warmup: int) -> tuple[int, list[int]]:
    """The adaptive warm-up's plan: the steps of the start-near-the-mode optimisation, and the
    step counts at which the adaptation windows end (the last one is ``num_warmup``).

    Fewer than 20 warm-up steps are all optimisation (no window); otherwise the optimisation
    takes ``num_warmup // 6`` steps and the windows 50, 100, 200, ... steps, the last one taking
    what remains (a window that would leave less than twice its own length is the last).
    """
    if num_warmup <= 0:
        return 0, []
    if num_warmup < 20:
        return num_warmup, []
    start = max(10, num_warmup // _INIT_SHARE)
    ends: list[int] = []
    at, width = start, _FIRST_WINDOW
    while at < num_warmup:
        if at + 3 * width > num_warmup:
            width = num_warmup - at
        at += width
        ends.append(at)
        width *= 2
    return start, ends


class SGHMC(SamplerEngine):
    """Stochastic-gradient HMC over every latent site of a Pyro model (a sampler engine,
    :class:`pvae.steps.SamplerEngine`).

    :param lr: adaptive (the default): the largest step in the preconditioned coordinates
        (``eta * P_i <= lr * P_i``, P_i the posterior variance estimate; the step is often set
        lower by the minibatch noise or the curvature, see the module's docstring). Plain
        (``adaptive=False``): the learning rate per datapoint, each step using ``eta = lr / N``
        (N datapoints; 1 without data).
    :param friction: alpha, the share of the velocity lost per step (Springenberg et al.'s
        "mdecay"), in (0, 1], at the uncapped step; a step that the curvature caps lowers it
        by ``sqrt(step / uncapped step)`` (the friction in use: ``alpha``).
    :param adaptive: start near the mode and estimate the preconditioner, the gradient noise and
        the step during warm-up (windowed, then frozen); False: plain SGHMC (Chen et al. 2014)
        with an identity mass and no noise estimate (see the module's docstring for the regime
        in which it is accurate).
    :param init_radius: initial unconstrained values are drawn uniformly from
        ``(-init_radius, init_radius)`` (Pyro's ``init_to_uniform``).
    :param data_plate: the name of the plate holding the datapoints (``"data"``; ``pvae.sample``
        sets it for its run from its own ``data_plate=``).
    :param fast: evaluate the log joint through a :class:`pvae.potential.Potential` learned at
        :meth:`setup` (closed-form Normal priors, the N/B scale applied once, no trace; checked
        there against the traced log joint, and left off with a warning if they differ);
        False: the plain handler (every site's ``log_prob``). The two give the same log joint
        and gradient to rounding (float64: within 1e-12 relative), not bit for bit (sums
        taken in another order), so a chain's draws agree to float tolerance; ``pvae.sample``
        does not record the choice, so resume a run with the setting it started with for
        bit-identical draws.

    State (``state_dict``): the unconstrained values and velocities of every site, the
    optimiser's moments, the preconditioner, the gradient-noise estimate, the open window's
    sums, the step, the best log joint seen, the step counter and the random generator of the
    injected noise. Every step returns a :class:`pvae.steps.StepRecord` with ``log_joint`` = the
    minibatch estimate of log p(x, theta) in unconstrained space (Jacobian included) at the
    state where the gradient was taken, and ``loss = -log_joint`` (the potential U).
    """

    def __init__(
        self,
        lr: float = 0.05,
        friction: float = 0.3,
        adaptive: bool = True,
        init_radius: float = 2.0,
        data_plate: str = "data",
        fast: bool = True,
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
        self.data_plate = plate_name(data_plate)
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False, got {fast!r}")
        self.fast = fast
        self.reset()

    def settings(self) -> dict[str, Any]:
        """``lr``, ``friction``, ``adaptive`` and ``init_radius``."""
        return attribute_settings(self, "lr", "friction", "adaptive", "init_radius")

    # -- set-up ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the chain: :meth:`setup` must run again before the next step."""
        self.names: list[str] = []
        self.transforms: list[Any] = []
        self._maps: list[Any] = []  # the transforms, None for the identity
        self.shapes: dict[str, torch.Size] = {}
        self.theta: list[torch.Tensor] = []  # unconstrained values, leaves requiring grad
        self.velocity: list[torch.Tensor] = []
        self.adam_m: list[torch.Tensor] = []
        self.adam_v: list[torch.Tensor] = []
        self.precond: list[torch.Tensor] = []  # P: the inverse mass (posterior variance estimate)
        self.grad_var: list[torch.Tensor] = []  # V_hat: the gradient's variance
        self.secant: list[list[torch.Tensor]] = []
        # the open window's sums per site: [theta at its start, sum d, sum d^2, sum g, sum g^2]
        self.window: list[list[torch.Tensor]] = []
        self.window_count = 0
        self.step_size = 0.0  # eta (adaptive, once adapted)
        self.alpha = self.friction  # the friction per step in use (below friction: a capped step)
        self.curvature = 0.0  # lambda_max(P^1/2 H P^1/2) at the last window close (0: none)
        self.adapted = False
        self.best = -math.inf
        self.step_count = 0
        self.num_warmup = 0
        self.num_data = 1
        self.num_dims = 0
        self.batch_rows = 1
        self.stochastic = False
        self.generator = torch.Generator()
        self._init_steps = 0
        self._window_ends: list[int] = []
        self._eta: list[torch.Tensor | float] = []
        self._noise: list[torch.Tensor | float] = []
        self._potential: Potential | None = None

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
        :param num_data: N, the number of datapoints.
        :param num_warmup: steps of warm-up (the adaptive sampler optimises then adapts in them).
        :param seed: seeds this chain's generator (initial values and injected noise).
        :raises ValueError: the model has no latent site, a discrete latent site, or a
            per-datapoint latent site while the batch holds fewer than N rows.
        """
        self.reset()
        self.num_data = max(1, int(num_data))
        self.num_warmup = int(num_warmup)
        self.generator.manual_seed(seed_value(seed))
        trace = _latent_sites(model, args, dict(kwargs or {}))
        frame = find_data_frame(trace, plate=self.data_plate)
        batch = frame.size if frame is not None else self.num_data
        self.stochastic = frame is not None and batch < self.num_data
        self.batch_rows = max(1, int(batch))
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            support = site["fn"].support
            if support.is_discrete:
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(site['fn']).__name__}, support "
                    f"{support}); SGHMC moves continuous latents only: marginalise it out "
                    "(sum over its values in the model) or give it a continuous relaxation"
                )
            plate = self.data_plate
            if self.stochastic and any(f.name == plate for f in site["cond_indep_stack"]):
                raise ValueError(
                    f"latent site {name!r} is inside pyro.plate({plate!r}): a per-datapoint "
                    f"latent, which SGHMC samples only when every step sees all {self.num_data} "
                    f"datapoints (batch_size >= N; the batch has {batch}). Minibatched "
                    "per-datapoint latents are not supported in this version"
                )
            transform = biject_to(support)
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
        self.num_dims = sum(t.numel() for t in self.theta)
        if self.fast:
            self._potential = self._checked_potential(model, trace, args, dict(kwargs or {}))
        self.velocity = [torch.zeros_like(t) for t in self.theta]
        self.adam_m = [torch.zeros_like(t) for t in self.theta]
        self.adam_v = [torch.zeros_like(t) for t in self.theta]
        self.precond = [torch.ones_like(t) for t in self.theta]
        self.grad_var = [torch.zeros_like(t) for t in self.theta]
        # the optimisation's secant sums per site: [previous theta, previous g, sum dtheta^2,
        # sum dg^2]
        self.secant = [[torch.zeros_like(t) for _ in range(4)] for t in self.theta]
        self._open_window()
        self._plan()
        self._frozen()

    def _plan(self) -> None:
        if self.adaptive:
            self._init_steps, self._window_ends = warmup_schedule(self.num_warmup)
        else:
            self._init_steps, self._window_ends = 0, []

    @property
    def adapting(self) -> bool:
        """Whether this step still belongs to the adaptive warm-up (adaptive only)."""
        return self.adaptive and self.step_count < self.num_warmup

    @property
    def optimising(self) -> bool:
        """Whether this step is one of the warm-up's start-near-the-mode optimisation steps."""
        return self.adaptive and self.step_count < self._init_steps

    def _open_window(self) -> None:
        self.window_count = 0
        self.window = [
            [t.detach().clone()] + [torch.zeros_like(t) for _ in range(4)] for t in self.theta
        ]

    def _frozen(self) -> None:
        """Per-coordinate step eta_i and injected-noise std, from the current estimates."""
        alpha = self.friction
        self._eta, self._noise = [], []
        self.alpha = alpha
        if not self.adapted:  # plain SGHMC, or an adaptive chain without warm-up
            eta = self.lr / self.num_data
            self._eta = [eta] * len(self.theta)
            self._noise = [math.sqrt(2 * alpha * eta)] * len(self.theta)
            return
        share = max(float((p * v).max()) for p, v in zip(self.precond, self.grad_var, strict=True))
        if self.stochastic:  # the minibatch noise's share eta * P_i * V_i / (2 alpha) bounded
            design = min(self.lr, 2 * alpha * _NOISE_SHARE / max(share, _EPS))
            curvature = self.curvature
        else:  # no minibatch noise: P_i V_i is the curvature seen along the window's path
            design = self.lr
            curvature = max(self.curvature, share)
        self.step_size = design
        if curvature > 0:  # the stiffest direction, coupling included, stays stable
            self.step_size = min(design, _STABLE / curvature)
        # The same dynamics in continuous time (time step sqrt(eta), friction alpha / sqrt(eta)
        # per unit time): a step capped below the one the friction was set for keeps the
        # friction per unit time, so the chain is not turned into an overdamped random walk.
        self.alpha = alpha * math.sqrt(self.step_size / design)
        alpha = self.alpha
        for p, v in zip(self.precond, self.grad_var, strict=True):
            eta_i = self.step_size * p
            variance = 2 * alpha * eta_i
            if self.stochastic:  # remove a share of the minibatch noise eta_i^2 V_i
                variance = (variance - _COMPENSATE * eta_i.square() * v).clamp(min=0.0)
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

    def _checked_potential(
        self, model: Callable, trace: Any, args: tuple, kwargs: dict
    ) -> Potential | None:
        """The fast potential learned from the setup's trace, if it gives the traced log joint
        and gradient at the initial state (relative 1e-10 in float64, 1e-4 otherwise);
        None (with a warning) if not."""
        identity = [transform is None for transform in self._maps]
        potential = Potential.from_trace(trace, self.names, identity)
        # Both runs see the same draws of a model that uses torch's, numpy's or Python's
        # global generators, and the chain's global random streams are left as they were.
        streams = rng_state()
        try:
            self._potential = None
            slow = self.log_joint(model, *args, **kwargs)
            slow_grads = torch.autograd.grad(slow, self.theta, allow_unused=True)
            set_rng_state(streams)
            self._potential = potential
            fast = self.log_joint(model, *args, **kwargs)
            fast_grads = torch.autograd.grad(fast, self.theta, allow_unused=True)
        finally:
            set_rng_state(streams)
        rtol = 1e-10 if slow.dtype == torch.float64 else 1e-4
        agree = _close(fast, slow, rtol) and all(
            (a is None and b is None) or (a is not None and b is not None and _close(a, b, rtol))
            for a, b in zip(fast_grads, slow_grads, strict=True)
        )
        if agree:
            return potential
        warnings.warn(
            "SGHMC's fast potential does not reproduce the model's traced log joint "
            f"({float(fast.detach()):.9g} against {float(slow.detach()):.9g}); using the "
            "traced log joint",
            RuntimeWarning,
            stacklevel=3,
        )
        return None

    @property
    def potential(self) -> Potential | None:
        """The fast potential of the chain's model (None before :meth:`setup`, with
        ``fast=False``, or when it failed its check at setup)."""
        return self._potential

    def log_joint(self, model: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """log p(x, theta) in unconstrained space at the current state (Jacobian included),
        differentiable with respect to the state.

        :raises ValueError: the model skipped a latent site of the chain, or sampled a latent
            site that it did not sample at :meth:`setup` (it would be drawn from its prior).
        """
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
        messenger: _LogJoint | FastLogJoint
        if self._potential is not None:
            messenger = self._potential.run(model, values, args, kwargs)
        else:
            messenger = _LogJoint(values)
            with messenger:
                model(*args, **kwargs)
        if messenger.unknown:
            raise ValueError(
                f"the model sampled latent sites {messenger.unknown} that it did not sample "
                f"when the chain was set up (its latent sites: {self.names}); SGHMC needs the "
                "same latent sites at every step (a site that appears later would be drawn "
                "from its prior at every step, not sampled): sample it on every call"
            )
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

        :raises SamplingDiverged: the log joint is NaN or infinite, or has collapsed (see the
            module's docstring).
        """
        if not self.theta:
            raise RuntimeError("SGHMC.setup(model, args, ...) must run before the first step")
        log_joint = self.log_joint(model, *args, **kwargs)
        value = float(log_joint.detach())
        self._check_divergence(value)
        grads = torch.autograd.grad(log_joint, self.theta)  # -grad U
        with torch.no_grad():
            if self.optimising:
                self._optimise(grads)
                if self.step_count + 1 == self._init_steps:  # the first window's step capped too
                    self.curvature = self._measure_curvature(
                        lambda: self._gradient(model, args, kwargs)
                    )
                    self._frozen()
            else:
                adapting = self.adapting
                if adapting:
                    self._accumulate(grads)
                self._move(grads)
                if adapting and self.step_count + 1 in self._window_ends:
                    self._close_window(lambda: self._gradient(model, args, kwargs))
        self.step_count += 1
        return StepRecord(loss=-value, bound=None, log_joint=value)

    def _check_divergence(self, value: float) -> None:
        if not math.isfinite(value):
            raise SamplingDiverged(
                f"the log joint became {value} at step {self.step_count}; lower the sampler's lr"
            )
        if value > self.best:
            self.best = value
        elif self.best - value > _BLOWUP * (abs(self.best) + self.num_dims + 1):
            raise SamplingDiverged(
                f"the log joint fell from {self.best:.6g} to {value:.6g} at step "
                f"{self.step_count}: the chain's state has exploded (largest |unconstrained "
                f"value| {self._largest():.3g}); lower the sampler's lr"
            )

    def _largest(self) -> float:
        return max(float(t.detach().abs().max()) for t in self.theta)

    def _optimise(self, grads: tuple[torch.Tensor, ...]) -> None:
        """One Adam step up the log joint (the start-near-the-mode phase); at its last step,
        the first preconditioner P_i, an estimate of the posterior variance 1 / h_i (h_i the
        curvature). Under minibatches: (N / B) / mean(g_i^2), since near the mode the squared
        gradient is mostly minibatch noise, about N / B times the curvature. With every
        datapoint in every step: the secant sqrt(sum dtheta_i^2 / sum dg_i^2) over the
        phase's second half (a curvature over-estimated by the other coordinates' coupling
        gives a smaller, safe, P_i)."""
        b1, b2 = _ADAM_BETAS
        k = self.step_count + 1
        first, last = _ADAM_LR
        lr = first * (last / first) ** (k / self._init_steps)
        second_half = 2 * k > self._init_steps
        for theta, m, v, g, secant in zip(
            self.theta, self.adam_m, self.adam_v, grads, self.secant, strict=True
        ):
            if second_half:
                if 2 * (k - 1) > self._init_steps:  # the previous step is in it too
                    secant[2].add_((theta - secant[0]).square())
                    secant[3].add_((g - secant[1]).square())
                secant[0].copy_(theta)
                secant[1].copy_(g)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step = (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + _EPS)
            theta.add_(step, alpha=lr)
        if k < self._init_steps:
            return
        # A coordinate whose gradient barely moved (a dead unit, a flat direction) would get a
        # huge P_i and a step that explodes: its gradient terms are floored at 1% of their
        # average over all coordinates.
        squares = [v / (1 - b2**k) for v in self.adam_v]
        floor_v = _FLOOR * _average(squares)
        floor_g = _FLOOR * _average([secant[3] for secant in self.secant])
        for p, gv, mean_square, secant in zip(
            self.precond, self.grad_var, squares, self.secant, strict=True
        ):
            if self.stochastic:
                ratio = self.num_data / self.batch_rows
                p.copy_(ratio / (mean_square.clamp(min=floor_v) + _EPS))
            else:
                p.copy_((secant[2] / (secant[3].clamp(min=floor_g) + _EPS)).sqrt())
            gv.copy_(mean_square)
        self.adapted = True
        self._open_window()
        self._frozen()

    def _accumulate(self, grads: tuple[torch.Tensor, ...]) -> None:
        """Adds the state where the gradient was taken, and the gradient, to the window."""
        first = self.window_count == 0
        for theta, g, sums in zip(self.theta, grads, self.window, strict=True):
            if first:
                sums[0].copy_(theta)
                sums.append(g.clone())  # the gradient's reference: sums[5]
            d = theta - sums[0]
            dg = g - sums[5]
            sums[1].add_(d)
            sums[2].addcmul_(d, d)
            sums[3].add_(dg)
            sums[4].addcmul_(dg, dg)
        self.window_count += 1

    def _gradient(self, model: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The log joint's gradient at the current state, on the batch ``args``."""
        with torch.enable_grad():
            return torch.autograd.grad(self.log_joint(model, *args, **kwargs), self.theta)

    def _close_window(self, gradient: Callable[[], tuple[torch.Tensor, ...]]) -> None:
        """The window's estimates replace the preconditioner and the gradient noise, the
        curvature is measured under the new preconditioner (:meth:`_measure_curvature`); the
        velocity is rescaled to the new step (it stays a draw of its stationary law)."""
        n = self.window_count
        if n >= 2:
            old = [e if isinstance(e, torch.Tensor) else torch.tensor(e) for e in self._eta]
            for p, gv, sums in zip(self.precond, self.grad_var, self.window, strict=True):
                var = (sums[2] - sums[1].square() / n) / (n - 1)
                p.copy_(n / (n + 5.0) * var.clamp(min=0.0) + 1e-3 * 5.0 / (n + 5.0))
                gv.copy_(((sums[4] - sums[3].square() / n) / (n - 1)).clamp(min=0.0))
            self.curvature = self._measure_curvature(gradient)
            self._frozen()
            for v, before, after in zip(self.velocity, old, self._eta, strict=True):
                v.mul_((after / before).sqrt())
        self._open_window()

    def _measure_curvature(self, gradient: Callable[[], tuple[torch.Tensor, ...]]) -> float:
        """lambda_max of ``M = P^1/2 H P^1/2`` at the current state (H the negative Hessian of
        the log joint on this batch), by power iteration with finite-difference products
        ``H w ~ -(g(theta + h w) - g(theta)) / h`` (gradients only; the probe moves the state
        by 1% of the posterior sds' norm). The step rule's ``P_i V_i`` sees each coordinate
        alone; this sees the coupled directions, which a window estimated while the chain
        still drifts can leave unstable (this discretisation is stable on a quadratic iff
        ``eta * lambda_max(M) < 2 (2 - friction)``). The state and every random stream are
        left as they were; the start vector comes from a generator seeded by the step count.
        Returns |Rayleigh quotient| after :data:`_POWER_STEPS` iterations (0 if it is not
        finite)."""
        streams = rng_state()
        start = [t.detach().clone() for t in self.theta]
        roots = [p.sqrt() for p in self.precond]
        draws = torch.Generator().manual_seed(self.step_count)
        u = [torch.randn(t.shape, generator=draws, dtype=t.dtype).to(t.device) for t in start]
        probe = _PROBE * math.sqrt(float(sum(p.sum() for p in self.precond)))
        estimate = 0.0
        try:
            base = gradient()
            for _ in range(_POWER_STEPS):
                norm = math.sqrt(float(sum(x.square().sum() for x in u)))
                if not norm > 0 or not math.isfinite(norm):
                    return 0.0
                unit = [x / norm for x in u]
                w = [r * x for r, x in zip(roots, unit, strict=True)]  # P^1/2 u
                h = probe / max(math.sqrt(float(sum(x.square().sum() for x in w))), _EPS)
                with torch.no_grad():
                    for t, x in zip(self.theta, w, strict=True):
                        t.add_(x, alpha=h)
                moved = gradient()
                with torch.no_grad():
                    for t, x in zip(self.theta, start, strict=True):
                        t.copy_(x)
                u = [r * (b - a) / h for r, a, b in zip(roots, moved, base, strict=True)]  # M u
                estimate = float(sum((x * y).sum() for x, y in zip(unit, u, strict=True)))
        finally:
            with torch.no_grad():
                for t, x in zip(self.theta, start, strict=True):
                    t.copy_(x)
            set_rng_state(streams)
        return abs(estimate) if math.isfinite(estimate) else 0.0

    def _move(self, grads: tuple[torch.Tensor, ...]) -> None:
        alpha = self.alpha
        for theta, v, g, eta, noise in zip(
            self.theta, self.velocity, grads, self._eta, self._noise, strict=True
        ):
            draw = torch.randn(v.shape, generator=self.generator, dtype=v.dtype)
            v.mul_(1 - alpha).add_(g * eta).add_(draw.to(v.device) * noise)
            theta.add_(v)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue the chain exactly."""
        return {
            "names": list(self.names),
            "theta": [t.detach().clone() for t in self.theta],
            "velocity": [t.clone() for t in self.velocity],
            "adam_m": [t.clone() for t in self.adam_m],
            "adam_v": [t.clone() for t in self.adam_v],
            "precond": [t.clone() for t in self.precond],
            "grad_var": [t.clone() for t in self.grad_var],
            "window": [[t.clone() for t in sums] for sums in self.window],
            "secant": [[t.clone() for t in sums] for sums in self.secant],
            "window_count": self.window_count,
            "step_size": self.step_size,
            "curvature": self.curvature,
            "adapted": self.adapted,
            "best": self.best if math.isfinite(self.best) else None,
            "step_count": self.step_count,
            "num_warmup": self.num_warmup,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a chain set up on the same model.

        :raises ValueError: the state is not one of this sampler (keys missing), holds other
            sites, or tensors of other shapes.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"the SGHMC state must be a mapping, got {type(state).__name__}")
        missing = [key for key in (*_STATE_KEYS, "window_count") if key not in state]
        if missing:
            raise ValueError(
                f"the SGHMC state lacks {missing}: it is not a state of this sampler (a damaged "
                "or edited checkpoint); start a new run"
            )
        if list(state["names"]) != self.names:
            raise ValueError(
                f"the SGHMC state holds sites {list(state['names'])}, the model has {self.names}"
            )
        for key in ("theta", "velocity", "adam_m", "adam_v", "precond", "grad_var"):
            saved = state[key]
            if len(saved) != len(self.theta) or any(
                tuple(s.shape) != tuple(t.shape) for s, t in zip(saved, self.theta, strict=True)
            ):
                raise ValueError(f"the SGHMC state's {key!r} does not match the model's sites")
        with torch.no_grad():
            for key in ("theta", "velocity", "adam_m", "adam_v", "precond", "grad_var"):
                for mine, saved in zip(getattr(self, key), state[key], strict=True):
                    mine.copy_(saved)
        self.window = [[t.clone() for t in sums] for sums in state["window"]]
        self.secant = [[t.clone() for t in sums] for sums in state["secant"]]
        self.window_count = int(state["window_count"])
        self.step_size = float(state["step_size"])
        self.curvature = float(state.get("curvature", 0.0))  # absent in older checkpoints
        self.adapted = bool(state["adapted"])
        self.best = -math.inf if state["best"] is None else float(state["best"])
        self.step_count = int(state["step_count"])
        self.num_warmup = int(state["num_warmup"])
        self.generator.set_state(state["generator"])
        self._plan()
        self._frozen()


def _average(tensors: list[torch.Tensor]) -> float:
    """The mean of every element of ``tensors``."""
    return float(sum(t.sum() for t in tensors)) / max(1, sum(t.numel() for t in tensors))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Whether ``a`` and ``b`` agree to ``rtol`` relative to the largest magnitude of ``b``
    (at least 1)."""
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    return (
        bool((a.detach() - b.detach()).abs().max() <= rtol * max(scale, 1e-30))
        if b.numel()
        else True
    )


def _is_identity(transform: Any) -> bool:
    """Whether ``transform`` (from ``biject_to``) is the identity, possibly made independent."""
    while isinstance(transform, transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, transforms.ComposeTransform) and not transform.parts
