"""The conditional variational autoencoder (Sohn, Lee & Yan 2015, "Learning Structured Output
Representations using Deep Conditional Generative Models").

Generative story, for each datapoint n, given an input x_n (an argument, never a sample site):

    z_n ~ p_theta(z | x_n) = N(mu_theta(x_n), diag sigma_theta(x_n)^2)      (prior network)
    y_n | x_n, z_n ~ p_theta(y | x_n, z_n)       (generation network; likelihood chosen by name)

Inference network (guide):

    q_phi(z_n | x_n, y_n) = N(mu_phi(x_n, y_n), diag sigma_phi(x_n, y_n)^2)  (recognition network)

Objectives (Sohn et al.), one per ``objective=``:

    "cvae":   E_q[log p(y | x, z)] - KL(q(z | x, y) || p(z | x))  <=  log p(y | x)
    "gsnn":   E_{p(z | x)}[log p(y | x, z)]                        <=  log p(y | x)
    "hybrid": alpha * CVAE + (1 - alpha) * GSNN

They are written as model/guide pairs, so every engine of :mod:`pvae.inference` trains each
one, nothing special-cased:

- "cvae": latent site ``"z"`` drawn by the guide from the recognition network.
- "gsnn": the guide draws ``"z"`` from the prior network itself, so log p(z | x) - log q(z)
  is exactly 0 and the ELBO is the GSNN objective (IWAE_K becomes
  log (1/K) sum_k p(y | x, z_k), z_k ~ p(z | x)). The recognition network is not used.
- "hybrid": two latent sites and two observations of y: ``"z"`` (recognition network) with
  ``"y"``, both scaled by alpha, and ``"z_gsnn"`` (prior network) with ``"y_gsnn"``, both
  scaled by 1 - alpha (``pyro.poutine.scale``). A part whose weight is 0 is left out, so
  ``alpha=1`` is the "cvae" pair and ``alpha=0`` keeps only ``"z_gsnn"``/``"y_gsnn"``.

``kl_weight`` (a weight on the KL term, as in attribute-conditioned generation, the seed
paper "Learning Structured Output Representations from Attributes") scales the ``"z"`` site
in both model and guide, i.e. log p(z | x) and log q(z | x, y) and hence the KL (and, under
importance-weighted engines, the latent part of every log weight). It has no effect on the
GSNN parts, whose KL is 0.

What the engines report: with ``kl_weight=1`` the reported value is a lower bound on
sum_n log p(y_n | x_n) for "cvae" and "gsnn" (each is an ordinary model/guide pair of the
same p(y, z | x)) and for "hybrid" (at most alpha times the CVAE part's bound plus 1 - alpha
times the GSNN part's, by Jensen's inequality for the ELBO and Hoelder's for the importance-
weighted engines). With ``kl_weight != 1`` it is not, in general (with ``kl_weight < 1`` it can
exceed log p(y | x)). :meth:`CVAE.conditional_log_likelihood` always evaluates log p(y | x)
with the plain one-latent pair (``kl_weight=1``), whatever the objective.

The conditional log-likelihood is pvae's shared importance-sampled estimator: x is an argument
of the pair, not an observed site, so the estimator gives log p(y | x)::

    cvae = CVAE(x_dim=196, y_dim=588, z_dim=16)                 # objective="cvae"
    pvae.fit(cvae.model, cvae.guide, (x, y), engine=IWAE(num_particles=10), epochs=10)
    ll = pvae.log_likelihood(cvae.model, cvae.guide, (x, y), num_samples=100)  # (N,) nats

The networks are registered with ``pyro.module`` where they are used (prior network,
generation network and likelihood in the model; recognition network, or the prior network as
the GSNN's proposal, in the guide). The recognition network reads ``torch.cat([x, y], -1)``,
the generation network ``torch.cat([z, x], -1)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.nn import PyroModule

from pvae import likelihoods, nets
from pvae.evaluate import log_likelihood

from ._names import claim

OBJECTIVES = ("cvae", "gsnn", "hybrid")
PROPOSALS = ("recognition", "prior")


class _Part(NamedTuple):
    """One (latent, observation) pair of sites and how they are weighted."""

    latent: str
    observed: str
    proposal: str  # "recognition": q(z | x, y); "prior": p(z | x) (GSNN)
    weight: float  # scale of the observation site (and of the latent site's KL)
    kl_weight: float  # extra scale of the latent site only


@contextlib.contextmanager
def _scaled(scale: float) -> Iterator[None]:
    """``poutine.scale(scale)``, or nothing when ``scale == 1``."""
    if scale == 1.0:
        yield
    else:
        with poutine.scale(scale=scale):
            yield


def _check_unit_interval(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class CVAE(PyroModule):
    """A conditional VAE p(y | x) with MLP prior, recognition and generation networks.

    :param x_dim: dimension of the conditioning input x (flattened).
    :param y_dim: dimension of the output y (flattened).
    :param z_dim: latent dimension.
    :param hidden: hidden widths of the prior and recognition MLPs; the generation MLP uses
        them reversed. ``()`` makes every network a single linear layer.
    :param likelihood: of y given (x, z): "bernoulli", "continuous_bernoulli", "gaussian",
        "poisson", "categorical" (see :mod:`pvae.likelihoods`; keywords via ``likelihood_kw``).
    :param objective: "cvae", "gsnn" or "hybrid" (see the module docstring).
    :param alpha: weight of the CVAE part of the hybrid objective, in [0, 1].
    :param kl_weight: weight of the KL term (> 0); 1 gives the bound on log p(y | x).
    :param net: "mlp" (the only kind: the networks read concatenations, not images).
    :param activation: activation of the MLPs.

    Sites: ``"z"`` and ``"y"`` (plus ``"z_gsnn"`` and ``"y_gsnn"`` for the hybrid), inside
    ``pyro.plate("data", x.shape[0])``. Shapes: ``x (batch, x_dim)``, ``y (batch, y_dim)``.
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200, 200),
        likelihood: str = "bernoulli",
        objective: str = "cvae",
        alpha: float = 0.5,
        kl_weight: float = 1.0,
        net: str = "mlp",
        activation: type[torch.nn.Module] = torch.nn.ReLU,
        likelihood_kw: dict | None = None,
        name: str = "cvae",
    ):
        super().__init__(claim(name, self))
        for arg, value in (("x_dim", x_dim), ("y_dim", y_dim), ("z_dim", z_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {objective!r}; valid objectives are: {', '.join(OBJECTIVES)}"
            )
        alpha = _check_unit_interval(alpha, "alpha")
        if (
            isinstance(kl_weight, bool)
            or not isinstance(kl_weight, int | float)
            or not 0 < kl_weight < float("inf")
        ):
            raise ValueError(f"kl_weight must be a positive finite number, got {kl_weight!r}")
        if net != "mlp":
            raise ValueError(
                f"CVAE supports net='mlp' only (its networks read the concatenations [x, y] "
                f"and [z, x], not images), got net={net!r}"
            )
        self.x_dim, self.y_dim, self.z_dim = x_dim, y_dim, z_dim
        self.objective, self.alpha, self.kl_weight = objective, alpha, float(kl_weight)
        self.likelihood = likelihoods.get(likelihood, y_dim, **(likelihood_kw or {}))
        hidden = tuple(hidden)
        self.prior_net = nets.MLPEncoder(x_dim, z_dim, hidden, activation)
        self.recognition_net = nets.MLPEncoder(x_dim + y_dim, z_dim, hidden, activation)
        self.generation_net = nets.MLPDecoder(
            z_dim + x_dim,
            y_dim * self.likelihood.param_size,
            tuple(reversed(hidden)),
            activation,
        )

    # -- the objective as sites ---------------------------------------------------------------
    @property
    def parts(self) -> tuple[_Part, ...]:
        """The (latent, observation) site pairs of the training objective, with their scales."""
        if self.objective == "cvae":
            return (_Part("z", "y", "recognition", 1.0, self.kl_weight),)
        if self.objective == "gsnn":
            return (_Part("z", "y", "prior", 1.0, 1.0),)
        alpha = self.alpha
        parts = []
        if alpha > 0:
            parts.append(_Part("z", "y", "recognition", alpha, self.kl_weight))
        if alpha < 1:
            parts.append(_Part("z_gsnn", "y_gsnn", "prior", 1.0 - alpha, 1.0))
        return tuple(parts)

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(
                f"x must have shape (batch, x_dim={self.x_dim}), got "
                f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}"
            )
        if y is None:
            return
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[1] != self.y_dim:
            raise ValueError(
                f"y must have shape (batch, y_dim={self.y_dim}), got "
                f"{tuple(getattr(y, 'shape', ())) or type(y).__name__}"
            )
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}"
            )

    def _prior(self, x: torch.Tensor) -> TorchDistributionMixin:
        """p(z | x) from the prior network; batch shape ``(batch,)``, event ``(z_dim,)``."""
        loc, scale = self.prior_net(x)
        return dist.Normal(loc, scale).to_event(1)

    def _recognition(self, x: torch.Tensor, y: torch.Tensor) -> TorchDistributionMixin:
        """q(z | x, y) from the recognition network."""
        loc, scale = self.recognition_net(torch.cat([x, y.to(x.dtype)], -1))
        return dist.Normal(loc, scale).to_event(1)

    def _generation_params(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Parameters of p(y | x, z), ``(..., batch, y_dim * param_size)``; ``z`` may carry
        leading particle dimensions ``(..., batch, z_dim)``, ``x`` is ``(batch, x_dim)``."""
        x = x.expand(z.shape[:-1] + x.shape[-1:])
        return self.generation_net(torch.cat([z, x], -1))

    def _model(self, x: torch.Tensor, y: torch.Tensor | None, parts: Sequence[_Part]) -> None:
        self._check_inputs(x, y)
        pyro.module(f"{self._pyro_name}.prior_net", self.prior_net)
        pyro.module(f"{self._pyro_name}.generation_net", self.generation_net)
        pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            prior = self._prior(x)
            for part in parts:
                with _scaled(part.weight * part.kl_weight):
                    z = pyro.sample(part.latent, prior)
                with _scaled(part.weight):
                    y_dist = self.likelihood(self._generation_params(x, z)).to_event(1)
                    pyro.sample(part.observed, y_dist, obs=y)

    def _guide(self, x: torch.Tensor, y: torch.Tensor | None, parts: Sequence[_Part]) -> None:
        self._check_inputs(x, y)
        proposals = {"prior" if y is None else part.proposal for part in parts}
        if "recognition" in proposals:
            pyro.module(f"{self._pyro_name}.recognition_net", self.recognition_net)
        if "prior" in proposals:
            pyro.module(f"{self._pyro_name}.prior_net", self.prior_net)
        with pyro.plate("data", x.shape[0]):
            for part in parts:
                if part.proposal == "recognition" and y is not None:
                    q = self._recognition(x, y)
                else:
                    q = self._prior(x)
                with _scaled(part.weight * part.kl_weight):
                    pyro.sample(part.latent, q)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """p(y, z | x) for inputs ``x (batch, x_dim)`` and outputs ``y (batch, y_dim)``;
        with ``y=None`` the model samples y."""
        self._model(x, y, self.parts)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """q(z | x, y) (the prior network for the GSNN parts). With ``y=None`` every latent is
        drawn from the prior network p(z | x), so ``pyro.infer.Predictive(model, guide=guide)``
        samples y from p(y | x)."""
        self._guide(x, y, self.parts)

    # -- evaluation -----------------------------------------------------------------------------
    def conditional_log_likelihood(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_samples: int = 1000,
        proposal: str | None = None,
        batch_size: int = 100,
        **kwargs,
    ) -> torch.Tensor:
        """Importance-sampled log p(y_n | x_n), shape ``(N,)``, nats (higher is better).

        Uses :func:`pvae.log_likelihood` on the plain CVAE pair (one latent, ``kl_weight=1``)
        built from these networks, so it is the same quantity whatever the training objective:

            log p(y | x) ~= log (1/K) sum_k p(y | x, z_k) p(z_k | x) / r(z_k),  z_k ~ r

        :param proposal: r = "recognition" (q(z | x, y)) or "prior" (p(z | x)). The default is
            the recognition network, except for objectives that never train it ("gsnn", and
            "hybrid" with ``alpha=0``).
        :param kwargs: passed to :func:`pvae.log_likelihood` (``chunk_size``, ``progress``).
        """
        if proposal is None:
            uses_recognition = any(p.proposal == "recognition" for p in self.parts)
            proposal = "recognition" if uses_recognition else "prior"
        if proposal not in PROPOSALS:
            raise ValueError(
                f"unknown proposal {proposal!r}; valid proposals are: {', '.join(PROPOSALS)}"
            )
        parts = (_Part("z", "y", proposal, 1.0, 1.0),)

        def model(x, y):
            self._model(x, y, parts)

        def guide(x, y):
            self._guide(x, y, parts)

        return log_likelihood(
            model, guide, (x, y), num_samples=num_samples, batch_size=batch_size, **kwargs
        )

    # -- conveniences (no engine needs them) ----------------------------------------------------
    @torch.no_grad()
    def prior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of p(z | x), each ``(batch, z_dim)``."""
        return self.prior_net(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x, y), each ``(batch, z_dim)``."""
        return self.recognition_net(torch.cat([x, y.to(x.dtype)], -1))

    @torch.no_grad()
    def decode(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(y | x, z): ``x (batch, x_dim)``, ``z (..., batch, z_dim)`` ->
        ``(..., batch, y_dim)``."""
        return self.likelihood.mean(self._generation_params(x, z))

    @torch.no_grad()
    def sample(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Means of p(y | x, z) for ``z ~ p(z | x)``: ``(num_samples, batch, y_dim)``
        (diverse outputs for one input, Sohn et al.'s stochastic inference)."""
        loc, scale = self.prior_net(x)
        z = loc + scale * torch.randn((num_samples,) + loc.shape, dtype=loc.dtype)
        return self.decode(x, z)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """A point prediction of y, ``(batch, y_dim)``.

        With ``num_samples=None`` the mean of p(y | x, z) at the prior mean z = E[z | x]
        (Sohn et al.'s deterministic inference); otherwise E[y | x], the average of
        :meth:`sample` over ``num_samples`` draws.
        """
        if num_samples is None:
            return self.decode(x, self.prior_net(x)[0])
        return self.sample(x, num_samples).mean(0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean of p(y | x, z) at the recognition mean of z, ``(batch, y_dim)``."""
        return self.decode(x, self.encode(x, y)[0])


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from typing import Any  # noqa: E402

from pvae.app.registry import Choice, Integer, ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    given: int,
    objective: str,
    alpha: float,
    kl_weight: float,
) -> CVAE:
    require_mlp("cvae", net)
    given_dim = int(ds.info.get("x_dim_given", 0))
    if not given_dim:
        raise ValueError("model 'cvae' needs the quadrant task of an image dataset")
    return CVAE(
        x_dim=given_dim,
        y_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        objective=objective,
        alpha=alpha,
        kl_weight=kl_weight,
    )


def _quadrant_task(ds: Splits, options: Any) -> Splits:
    """x = the first ``given`` quadrants of each image, y = the rest (a conditional task)."""
    from pvae.data.quadrants import quadrant_task

    return quadrant_task(ds, int(options["given"]))


CARD = ModelCard(
    name="cvae",
    description="conditional VAE p(y | x) on image quadrants: x the given ones, y the rest "
    "(Sohn et al. 2015)",
    factory=_build,
    accepts=("images",),
    options=(
        Option("given", Integer(1, 3), 1, "quadrants given as the input x (1, 2 or 3)"),
        Option.of(CVAE, "objective", Choice(OBJECTIVES), help="objective"),
        Option.of(CVAE, "alpha", Real(0.0, 1.0)),
        Option.of(CVAE, "kl_weight", Real(0.0, open_below=True)),
    ),
    capabilities=("sample",),
    prepare=_quadrant_task,
    decoder=lambda model: None,  # decode(x, z) needs the input x too
)
