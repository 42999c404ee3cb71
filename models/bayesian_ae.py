"""The Bayesian autoencoder (Tran, Nguyen, Rossi, Bonilla, Filippone and Michiardi 2021).

Every weight and bias of the encoder f_enc and the decoder f_dec is a random variable with a
Gaussian prior, and a datapoint is explained by its own reconstruction:

    theta_l ~ N(0, s_l^2 I)                      (each layer l's weights and biases, scale s_l)
    x_n | theta ~ p(x | f_dec(f_enc(x_n; theta_enc); theta_dec))     n = 1..N  (by name)

There are no per-datapoint latent variables: the codes ``z_n = f_enc(x_n)`` are deterministic
given the weights, so the posterior p(theta | x_1..N) is over the weights alone and is sampled
with SGHMC (:class:`pvae.inference.SGHMC` through :func:`pvae.sample`). ``model(x)`` reads the
weights (``PyroSample`` attributes) once, outside the data plate, then scores x inside
``pyro.plate("data")``: under minibatching the likelihood counts N/B times, the prior once.

After sampling (S posterior draws theta_s):

- :meth:`reconstruct`: the posterior predictive mean of the reconstruction,
  ``(1/S) sum_s E[x | f(x; theta_s)]``, and its standard deviation over draws (the
  uncertainty of the weights, per pixel);
- :meth:`log_likelihood`: ``log (1/S) sum_s p(x | f(x; theta_s))`` per datapoint;
- :meth:`fit_latent_mixture` and :meth:`generate`: as Tran et al. generate, a Dirichlet-process
  Gaussian mixture (scikit-learn's ``BayesianGaussianMixture``) is fitted to the codes of the
  data under the posterior draws, and codes drawn from it are decoded;
- :meth:`select_prior`: the prior scales s_l are chosen by minimising the distributional
  sliced-Wasserstein distance (:func:`pvae.diagnostics.distributional_sliced_wasserstein`)
  between the prior-predictive outputs ``E[x | f(x; theta)]``, theta ~ p(theta), and the data;
  ``metric="sw"`` uses the plain sliced Wasserstein distance.

The priors, the prior-predictive draw and the mixture are written so that a model with
another latent prior (a sparse-GP prior over codes, :class:`pvae.models.SGPBAE`) can reuse them:
:func:`layer_widths`, :class:`BayesianLinear`, :func:`bayesian_layers` (an MLP's layers with
weight priors), :func:`read_weights` and :func:`run_layers` (read each layer's sites once, run the
layers), :func:`fit_dp_mixture`, :func:`prior_distance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample, pyro_method
from torch import Tensor, nn

from pvae import likelihoods

from ._names import claim

__all__ = [
    "BayesianAE",
    "BayesianLinear",
    "PriorSelection",
    "bayesian_layers",
    "fit_dp_mixture",
    "layer_widths",
    "prior_distance",
    "read_weights",
    "run_layers",
]

Weights = list[tuple[Tensor, Tensor]]
PriorScale = float | Mapping[str, float]


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def layer_widths(x_dim: int, z_dim: int, hidden: Sequence[int]) -> tuple[list[int], list[int]]:
    """The widths of the encoder ``[x_dim, *hidden, z_dim]`` and of the decoder
    ``[z_dim, *reversed(hidden), x_dim]`` (its last layer then emits ``param_size`` numbers
    per data dimension)."""
    for name, value in (("x_dim", x_dim), ("z_dim", z_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    hidden = tuple(hidden)
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden):
        raise ValueError(f"hidden must be positive integer widths, got {hidden!r}")
    return [x_dim, *hidden, z_dim], [z_dim, *reversed(hidden), x_dim]


class BayesianLinear(PyroModule):
    """A linear layer ``y = x W^T + b`` whose ``weight`` ``(out, in)`` and ``bias`` ``(out,)``
    are ``PyroSample`` sites with the prior ``N(0, prior_scale^2)`` on every entry.

    The prior is built once (not at every read) and follows the module's dtype and device:
    ``.double()`` or ``.to(device)`` rebuilds it from the (non-persistent) buffer ``prior_loc``.
    """

    prior_loc: Tensor

    def __init__(self, in_features: int, out_features: int, prior_scale: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("prior_loc", torch.zeros(()), persistent=False)
        self.set_prior_scale(prior_scale)

    def set_prior_scale(self, prior_scale: float) -> None:
        """Replace the prior of the weights and the bias by ``N(0, prior_scale^2)``."""
        self.prior_scale = _positive(prior_scale, "prior_scale")
        weight_shape, bias_shape = (self.out_features, self.in_features), (self.out_features,)
        self.weight = PyroSample(self.prior(self.prior_scale, weight_shape, self.prior_loc))
        self.bias = PyroSample(self.prior(self.prior_scale, bias_shape, self.prior_loc))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> BayesianLinear:
        """After a change of dtype or device, rebuild the priors in the new ones."""
        super()._apply(fn, *args, **kwargs)
        self.set_prior_scale(self.prior_scale)
        return self

    @staticmethod
    def prior(scale: float, shape: tuple[int, ...], loc: Tensor | None = None) -> dist.Distribution:
        """N(0, scale^2) on every entry of a tensor of ``shape`` (one event); ``loc``: a zero
        tensor whose dtype and device the prior takes.

        One scalar Normal broadcast over ``shape`` (``ExpandedDistribution``), not a Normal
        with expanded parameters: its log density takes the log and the square of the scale
        once, not once per weight (the same numbers, about a quarter of the time)."""
        normal = dist.Normal(0.0 if loc is None else loc, scale)
        return dist.ExpandedDistribution(normal, shape).to_event(len(shape))

    def draw(self, scale: float | None = None, generator: torch.Generator | None = None):
        """A draw ``(weight, bias)`` from the prior (``scale``: another prior scale)."""
        scale = self.prior_scale if scale is None else scale
        weight = torch.randn(self.out_features, self.in_features, generator=generator) * scale
        return weight, torch.randn(self.out_features, generator=generator) * scale


def bayesian_layers(widths: Sequence[int], prior_scale: float = 1.0) -> nn.ModuleList:
    """A ``PyroModule`` list of :class:`BayesianLinear` layers ``widths[i] -> widths[i + 1]``,
    all with the prior ``N(0, prior_scale^2)`` (a PyroModule, so that its layers' sites are
    named under the parent's prefix: ``{prefix}.{attribute}.{i}.weight``)."""
    layers = [BayesianLinear(a, b, prior_scale) for a, b in zip(widths, widths[1:], strict=False)]
    return PyroModule[nn.ModuleList](layers)  # type: ignore[arg-type,return-value]


def read_weights(layers: nn.ModuleList) -> Weights:
    """Every layer's ``(weight, bias)``: each ``PyroSample`` site read once, in order."""
    return [(layer.weight, layer.bias) for layer in layers]  # type: ignore[misc]


def run_layers(h: Tensor, weights: Weights, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """The layers ``weights`` (``(weight (out, in), bias (out,))`` pairs) applied to ``h``
    ``(..., in)``, ``activation`` between them (none after the last)."""
    last = len(weights) - 1
    for i, (weight, bias) in enumerate(weights):
        h = F.linear(h, weight, bias)
        if i < last:
            h = activation(h)
    return h


@dataclass
class PriorSelection:
    """What :meth:`BayesianAE.select_prior` returns: the chosen candidate ``best`` (a prior
    scale as given), its index, the ``metric`` and the distance of every candidate."""

    best: PriorScale
    index: int
    metric: str
    distances: list[float] = field(default_factory=list)
    candidates: list[PriorScale] = field(default_factory=list)


def prior_distance(
    outputs: Tensor,
    x: Tensor,
    metric: str = "dswd",
    num_projections: int = 100,
    seed: int = 0,
    **kwargs: Any,
) -> float:
    """The distance between prior-predictive ``outputs`` ``(m, x_dim)`` and data ``x``
    ``(n, x_dim)``: ``"dswd"`` (distributional sliced Wasserstein) or ``"sw"`` (sliced
    Wasserstein), p = 2; ``kwargs`` go to the distance."""
    from pvae.diagnostics import wasserstein

    generator = torch.Generator().manual_seed(seed)
    if metric == "dswd":
        value = wasserstein.distributional_sliced_wasserstein(
            outputs, x, num_projections=num_projections, generator=generator, **kwargs
        )
    elif metric == "sw":
        value = wasserstein.sliced_wasserstein(
            outputs, x, num_projections=num_projections, generator=generator, **kwargs
        )
    else:
        raise ValueError(f"metric must be 'dswd' or 'sw', got {metric!r}")
    return float(value)


def fit_dp_mixture(codes: Tensor, max_components: int = 10, seed: int = 0) -> Any:
    """A Dirichlet-process Gaussian mixture (scikit-learn's ``BayesianGaussianMixture``
    with ``weight_concentration_prior_type="dirichlet_process"``, full covariances, at most
    ``max_components`` components) fitted to ``codes`` ``(n, z_dim)``."""
    try:
        from sklearn.mixture import BayesianGaussianMixture
    except ImportError as error:  # an optional dependency (pvae's "data" extra)
        raise ImportError(
            "fitting the latent mixture needs scikit-learn: pip install 'pyro-vae[data]'"
        ) from error
    if isinstance(max_components, bool) or not isinstance(max_components, int):
        raise TypeError(f"max_components must be a positive integer, got {max_components!r}")
    if max_components < 1:
        raise ValueError(f"max_components must be a positive integer, got {max_components!r}")
    if codes.dim() != 2 or codes.shape[0] < 2:
        raise ValueError(f"codes must have shape (n >= 2, z_dim), got {tuple(codes.shape)}")
    mixture = BayesianGaussianMixture(
        n_components=min(max_components, codes.shape[0]),
        weight_concentration_prior_type="dirichlet_process",
        covariance_type="full",
        max_iter=500,
        random_state=seed,
    )
    return mixture.fit(codes.detach().double().numpy())


class BayesianAE(PyroModule):
    """A Bayesian autoencoder: Gaussian priors on every encoder and decoder weight, the data's
    likelihood given its reconstruction; sampled with SGHMC.

    :param x_dim: data dimension (flattened).
    :param z_dim: code dimension (the encoder's output).
    :param hidden: hidden widths of the encoder; the decoder uses them reversed.
    :param likelihood: "bernoulli", "gaussian" (with a fixed ``scale`` in ``likelihood_kw``;
        default 0.1), "continuous_bernoulli", "poisson", ... (:mod:`pvae.likelihoods`); one that
        would learn a parameter is refused: only the weights are random, nothing is trained.
    :param prior_scale: s of the N(0, s^2) prior of every weight and bias, or a mapping from
        layer names (:attr:`layer_names`: ``"encoder.0"``, ..., ``"decoder.0"``, ...) to
        scales, per layer (layers it does not name take 1.0).
    :param activation: the activation between layers (a ``torch.nn.Module`` class).
    :param name: prefix of the site names (``"bae.encoder.0.weight"``, ...); each live model
        gets its own (``bae_1``, ...).

    Sites: ``{name}.encoder.{i}.weight`` ``(out, in)`` and ``.bias`` ``(out,)`` per layer, and
    the same for the decoder, all outside the data plate; the observed ``"x"`` inside it.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200,),
        likelihood: str = "bernoulli",
        prior_scale: PriorScale = 1.0,
        activation: type[nn.Module] = nn.ReLU,
        likelihood_kw: dict | None = None,
        name: str = "bae",
    ):
        encoder_widths, decoder_widths = layer_widths(x_dim, z_dim, hidden)
        super().__init__(claim(name, self))
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, tuple(hidden)
        kw = dict(likelihood_kw or {})
        if likelihood == "gaussian":
            kw.setdefault("scale", 0.1)
        self.likelihood = likelihoods.get(likelihood, x_dim, **kw)
        if any(True for _ in self.likelihood.parameters()):
            raise ValueError(
                f"likelihood {likelihood!r} would learn a parameter; a BayesianAE only samples "
                "its weights: fix it through likelihood_kw (e.g. {'scale': 0.1})"
            )
        self.activation = activation()
        decoder_widths[-1] = x_dim * self.likelihood.param_size
        self.encoder: nn.ModuleList = bayesian_layers(encoder_widths)
        self.decoder: nn.ModuleList = bayesian_layers(decoder_widths)
        self.set_prior_scale(prior_scale)
        self._mixture: Any = None
        self._mixture_weights: list[Weights] = []

    # -- the prior ---------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, BayesianLinear]:
        """Layer name (``"encoder.0"``, ..., ``"decoder.0"``, ...) -> layer, encoder first."""
        named = {f"encoder.{i}": layer for i, layer in enumerate(self.encoder)}
        named.update({f"decoder.{i}": layer for i, layer in enumerate(self.decoder)})
        return named  # type: ignore[return-value]

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def site_names(self) -> list[tuple[str, str]]:
        """``(weight site, bias site)`` of every layer, in :attr:`layer_names` order."""
        return [
            (f"{self._pyro_name}.{layer}.weight", f"{self._pyro_name}.{layer}.bias")
            for layer in self.layers
        ]

    @property
    def prior_scale(self) -> dict[str, float]:
        """The prior scale of every layer."""
        return {name: layer.prior_scale for name, layer in self.layers.items()}

    def _resolve_scale(self, prior_scale: PriorScale, base: Mapping[str, float]) -> dict:
        if isinstance(prior_scale, Mapping):
            unknown = sorted(set(prior_scale) - set(self.layers))
            if unknown:
                raise ValueError(
                    f"prior_scale names unknown layers {unknown}; the layers: "
                    f"{', '.join(self.layers)}"
                )
            resolved = dict(base)
            resolved.update(
                {k: _positive(v, f"prior_scale[{k!r}]") for k, v in prior_scale.items()}
            )
            return resolved
        scale = _positive(prior_scale, "prior_scale")
        return {name: scale for name in self.layers}

    def set_prior_scale(self, prior_scale: PriorScale) -> None:
        """Set the prior scale of every layer (a number) or of the layers a mapping names
        (the others keep theirs)."""
        resolved = self._resolve_scale(prior_scale, self.prior_scale)
        for name, layer in self.layers.items():
            layer.set_prior_scale(resolved[name])

    # -- the model ---------------------------------------------------------------------------
    def _read_weights(self) -> tuple[Weights, Weights]:
        """Every layer's ``(weight, bias)``: each ``PyroSample`` site read once."""
        return read_weights(self.encoder), read_weights(self.decoder)

    def network(self, x: Tensor, encoder: Weights, decoder: Weights) -> Tensor:
        """The likelihood's parameters ``f_dec(f_enc(x))``, ``(batch, x_dim * param_size)``."""
        return run_layers(run_layers(x, encoder, self.activation), decoder, self.activation)

    @pyro_method
    def model(self, x: Tensor) -> None:
        """p(theta) p(x | f(x; theta)) for a batch ``x`` of shape ``(batch, x_dim)``."""
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"x must have shape (batch, {self.x_dim}), got {tuple(x.shape)}")
        encoder, decoder = self._read_weights()  # outside the plate: global latents
        params = self.network(x, encoder, decoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.likelihood(params).to_event(1), obs=x)

    def forward(self, x: Tensor) -> None:
        return self.model(x)

    def guide(self, *args: Any, **kwargs: Any) -> None:
        """A BayesianAE has no variational guide: its weights are sampled."""
        raise ValueError(
            "BayesianAE is sampled, not trained with a variational engine: use "
            "pvae.sample(bae.model, x, sampler=pvae.inference.SGHMC()) or 'pvae sample'"
        )

    # -- posterior draws -----------------------------------------------------------------------
    def draws(self, posterior: Any, num_samples: int | None = None) -> list[tuple]:
        """The posterior's draws as ``(encoder weights, decoder weights)`` pairs: all of them
        (chains merged), or ``num_samples`` evenly spaced ones. ``posterior`` is a
        :class:`pvae.Posterior` or a mapping site -> ``(draws, *shape)``."""
        flat = posterior.flat() if hasattr(posterior, "flat") else dict(posterior)
        missing = [name for pair in self.site_names for name in pair if name not in flat]
        if missing:
            raise ValueError(
                f"posterior lacks the sites {missing[:3]} of this model (it was sampled for "
                f"another model or name; sites: {sorted(flat)[:3]} ...)"
            )
        total = int(flat[self.site_names[0][0]].shape[0])
        index: list[int] = list(range(total))
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int):
                raise TypeError(f"num_samples must be a positive integer, got {num_samples!r}")
            if not 1 <= num_samples <= total:
                raise ValueError(f"num_samples must be in [1, {total}], got {num_samples}")
            index = torch.linspace(0, total - 1, num_samples).round().long().tolist()
        count = len(self.encoder)
        out = []
        for s in index:
            weights = [(flat[w][s], flat[b][s]) for w, b in self.site_names]
            out.append((weights[:count], weights[count:]))
        return out

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.x_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor (batch, {self.x_dim}), got {shape}")
        return x

    @torch.no_grad()
    def reconstruct(
        self, posterior: Any, x: Tensor, num_samples: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Posterior predictive reconstructions: the mean over draws of ``E[x | f(x; theta_s)]``
        and its standard deviation over draws, each ``(batch, x_dim)``."""
        x = self._check_x(x)
        means = torch.stack(
            [
                self.likelihood.mean(self.network(x, e, d))
                for e, d in self.draws(posterior, num_samples)
            ]
        )
        sd = means.std(0, correction=0) if means.shape[0] > 1 else torch.zeros_like(means[0])
        return means.mean(0), sd

    @torch.no_grad()
    def log_likelihood(self, posterior: Any, x: Tensor, num_samples: int | None = None) -> Tensor:
        """``log (1/S) sum_s p(x_n | f(x_n; theta_s))`` per datapoint, ``(batch,)`` nats."""
        x = self._check_x(x)
        log_probs = torch.stack(
            [
                self.likelihood(self.network(x, e, d)).to_event(1).log_prob(x)
                for e, d in self.draws(posterior, num_samples)
            ]
        )
        return torch.logsumexp(log_probs, 0) - math.log(log_probs.shape[0])

    @torch.no_grad()
    def encode(
        self, posterior: Any, x: Tensor, num_samples: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The codes ``f_enc(x; theta_s)``: their mean and standard deviation over draws,
        each ``(batch, z_dim)``."""
        x = self._check_x(x)
        codes = torch.stack(
            [run_layers(x, e, self.activation) for e, _ in self.draws(posterior, num_samples)]
        )
        sd = codes.std(0, correction=0) if codes.shape[0] > 1 else torch.zeros_like(codes[0])
        return codes.mean(0), sd

    @torch.no_grad()
    def decode(self, z: Tensor, decoder: Weights) -> Tensor:
        """``E[x | f_dec(z)]`` under the decoder weights ``decoder``, ``(..., x_dim)``."""
        return self.likelihood.mean(run_layers(z, decoder, self.activation))

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_latent_mixture(
        self,
        posterior: Any,
        x: Tensor,
        num_samples: int | None = 10,
        max_components: int = 10,
        seed: int = 0,
    ) -> Any:
        """Fit a Dirichlet-process Gaussian mixture to the codes of ``x`` under
        ``num_samples`` posterior draws (all codes pooled, ``(num_samples * batch, z_dim)``),
        remember those draws' decoders for :meth:`generate`, and return the fitted
        ``sklearn.mixture.BayesianGaussianMixture``.

        The codes of different draws share one space while the draws come from one chain that
        moves slowly; chains started apart may use different code spaces: fit on one chain's
        draws then (``{site: t[c] for site, t in posterior.samples.items()}``, chain c's
        ``(draws, *shape)``).
        """
        x = self._check_x(x)
        total = _num_draws(posterior)
        draws = self.draws(posterior, None if num_samples is None else min(num_samples, total))
        codes = torch.cat([run_layers(x, e, self.activation) for e, _ in draws])
        self._mixture = fit_dp_mixture(codes, max_components=max_components, seed=seed)
        self._mixture_weights = [d for _, d in draws]
        return self._mixture

    @torch.no_grad()
    def generate(self, num_samples: int, seed: int | None = None) -> Tensor:
        """``num_samples`` new datapoints ``(num_samples, x_dim)`` (the likelihood's means):
        codes drawn from the mixture of :meth:`fit_latent_mixture`, each decoded by one of its
        posterior draws, taken in turn."""
        if self._mixture is None:
            raise ValueError("call fit_latent_mixture(posterior, x) before generate")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if seed is not None:
            self._mixture.random_state = seed
        codes, _ = self._mixture.sample(num_samples)
        codes = torch.as_tensor(codes, dtype=torch.get_default_dtype())
        codes = codes[torch.randperm(num_samples, generator=_generator(seed))]
        decoders = self._mixture_weights
        return torch.stack(
            [self.decode(codes[i], decoders[i % len(decoders)]) for i in range(num_samples)]
        )

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """:meth:`generate` (after :meth:`fit_latent_mixture`)."""
        return self.generate(num_samples)

    # -- prior selection -----------------------------------------------------------------------
    @torch.no_grad()
    def prior_predictive(
        self,
        x: Tensor,
        num_draws: int = 20,
        prior_scale: PriorScale | None = None,
        seed: int = 0,
    ) -> Tensor:
        """Outputs ``E[x | f(x; theta_k)]`` for ``num_draws`` prior draws theta_k (under
        ``prior_scale``, default the model's), pooled: ``(num_draws * batch, x_dim)``."""
        x = self._check_x(x)
        scales = self._resolve_scale(
            self.prior_scale if prior_scale is None else prior_scale, self.prior_scale
        )
        generator = torch.Generator().manual_seed(seed)
        count = len(self.encoder)
        outputs = []
        for _ in range(num_draws):
            weights = [layer.draw(scales[n], generator) for n, layer in self.layers.items()]
            params = self.network(x, weights[:count], weights[count:])
            outputs.append(self.likelihood.mean(params))
        return torch.cat(outputs)

    def select_prior(
        self,
        x: Tensor,
        scales: Sequence[PriorScale] = (0.1, 0.3, 1.0, 3.0),
        metric: str = "dswd",
        num_draws: int = 20,
        num_points: int = 200,
        num_projections: int = 100,
        seed: int = 0,
        apply: bool = True,
        **distance_kw: Any,
    ) -> PriorSelection:
        """Choose the prior scale as Tran et al. (2021) do: the candidate whose prior-predictive
        outputs on the data are closest to the data in ``metric`` ("dswd": distributional
        sliced Wasserstein; "sw": sliced Wasserstein).

        :param x: data ``(n, x_dim)``; its first ``num_points`` rows are the inputs and the
            target sample.
        :param scales: candidates, each a prior scale as :meth:`set_prior_scale` takes.
        :param num_draws: prior draws of the weights per candidate.
        :param apply: set the chosen scale on the model.
        :param distance_kw: passed to the distance (e.g. ``regularization``, ``num_steps``).
        """
        x = self._check_x(x)
        if metric not in ("dswd", "sw"):
            raise ValueError(f"metric must be 'dswd' or 'sw', got {metric!r}")
        candidates = list(scales)
        if not candidates:
            raise ValueError("scales must hold at least one candidate prior scale")
        points = x[:num_points]
        distances = []
        for candidate in candidates:
            outputs = self.prior_predictive(points, num_draws, candidate, seed)
            distances.append(
                prior_distance(outputs, points, metric, num_projections, seed, **distance_kw)
            )
        index = min(range(len(candidates)), key=lambda i: distances[i])
        if apply:
            self.set_prior_scale(candidates[index])
        return PriorSelection(candidates[index], index, metric, distances, candidates)


def _num_draws(posterior: Any) -> int:
    flat = posterior.flat() if hasattr(posterior, "flat") else dict(posterior)
    return int(next(iter(flat.values())).shape[0])


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import ModelCard, Option, Real, RealOrAuto  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402

AUTO = "auto"
"""The value of ``--bae-prior-scale`` that chooses the scale from the data."""

PRIOR_SCALES = (0.1, 0.3, 1.0, 3.0)
"""The candidates of ``--bae-prior-scale auto``."""


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    prior_scale: float | str,
    noise_scale: float,
) -> BayesianAE:
    """The BayesianAE; ``prior_scale="auto"``: the scale among :data:`PRIOR_SCALES` whose
    prior-predictive outputs on the training data are closest to them in the distributional
    sliced-Wasserstein distance (``BayesianAE.select_prior``, Tran et al. 2021), kept with
    its distances in the model's ``prior_selection`` attribute."""
    from pvae.evaluate import as_tensors

    require_mlp("bae", net)
    kw = {"scale": noise_scale} if likelihood == "gaussian" else {}
    auto = isinstance(prior_scale, str) and prior_scale.strip().lower() == AUTO
    model = BayesianAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        prior_scale=1.0 if auto else float(prior_scale),
        likelihood_kw=kw,
    )
    if auto:
        x = as_tensors(ds.train)[0].reshape(-1, ds.x_dim).to(torch.get_default_dtype())
        model.prior_selection = model.select_prior(x, scales=PRIOR_SCALES, metric="dswd")
    return model


CARD = ModelCard(
    name="bae",
    description="Bayesian autoencoder: priors on every weight, sampled with SGHMC by "
    "'pvae sample' (Tran et al. 2021)",
    factory=_build,
    options=(
        Option(
            "prior_scale",
            RealOrAuto(),
            AUTO,
            "sd of the N(0, s^2) weight prior; 'auto': the one of "
            f"{', '.join(map(str, PRIOR_SCALES))} whose prior predictive is closest to the "
            "training data in distributional sliced Wasserstein (DSWD)",
        ),
        Option(
            "noise_scale", Real(0.0, open_below=True), 0.1, "the fixed sd of a gaussian likelihood"
        ),
    ),
    capabilities=("sample",),
    decoder=lambda model: None,
    sampled=True,
)
