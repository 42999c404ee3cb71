"""Multimodal VAEs: product of experts (MVAE; Wu & Goodman 2018), mixture of experts (MMVAE;
Shi et al. 2019) and mixture of products of experts (MoPoE-VAE; Sutter et al. 2021).

Generative story, for each datapoint n with modalities m = 1..M (named, in declared order):

    z_n ~ N(0, I_{z_dim})
    x_{n,m} | z_n ~ p_theta_m(x_m | z_n)     every modality with its own decoder and likelihood

A modality missing from datapoint n (``mask[n, m]`` False) is not observed: its site is masked
and contributes nothing to any bound; its values may be anything (they are replaced by zeros).

Inference network. Each modality's encoder gives a Gaussian expert
q~_m(z | x_m) = N(mu_m(x_m), diag sigma_m(x_m)^2). For a subset S of the modalities

    q(z | x_S)  ∝  p(z) prod_{m in S} q~_m(z | x_m)          (the prior is an expert too)

is Gaussian (precisions add: 1 + sum_m sigma_m^-2; the mean is the precision-weighted mean of
the experts' means), and q(z | x_{empty set}) = p(z). With P the modalities present in the
datapoint, the fusions (``fusion=``) are::

    "poe":    q(z | x) = q(z | x_P)                                          (MVAE)
    "moe":    q(z | x) = (1/|P|) sum_{m in P} q(z | x_m)                      (MMVAE)
    "mopoe":  q(z | x) = (1/(2^|P| - 1)) sum_{non-empty S ⊆ P} q(z | x_S)     (MoPoE-VAE)

and p(z) when nothing is present. When the experts are the exact likelihood factors
(q~_m(z | x_m) ∝ p(x_m | z), e.g. linear-Gaussian decoders), q(z | x_S) is the exact posterior
p(z | x_S): so is the PoE guide, and so are the mixtures when one modality is present. With
``prior_expert=False`` the prior is left out of every non-empty product (an ablation; MMVAE's
unimodal posteriors are then the encoders' outputs as they are).

Objectives (``objective=``; the first listed for each fusion is its paper's and the default).
Each is an ordinary model/guide pair, so every engine of :mod:`pvae.inference` trains it:

- "poe" / "subsampled" (Wu & Goodman's sub-sampled training): ELBO(x) + sum_m ELBO(x_m). The
  joint term is the latent site ``"z"`` with the observed sites named after the modalities;
  each unimodal term m has its own latent ``"z|<m>"`` drawn from q(z | x_m) and observes only
  x_m, at the site ``"<m>|<m>"``. (Their extra terms for k random subsets are left out; with
  two modalities there are none.) The value an engine reports bounds
  log p(x) + sum_m log p(x_m), not log p(x) (for the importance-weighted engines too: each
  particle's weight is the product of the terms' independent weights, an unbiased estimate
  of p(x) prod_m p(x_m)).
- "poe" / "joint": the joint term alone; the pair bounds log p(x).
- "moe" / "mixture" (Shi et al.): one latent ``"z"`` drawn from the mixture by *stratified*
  sampling (below) and scored with the mixture's density: log w = log p(x, z) - log q(z | x).
  With C components, the ELBO is Shi et al.'s stratified ELBO
  (1/C) sum_c E_{q_c}[log p(x, z) - log q(z | x)]. IWAE_K is log (1/K) sum_k w_k with K/C
  draws from each component: the mean is an unbiased estimate of p(x) (stratified importance
  sampling), so it is a bound that tends to log p(x) as K grows. Shi et al.'s stratified IWAE
  with K' draws per component, (1/C) sum_c E log (1/K') sum_k w(z_c^k), is exactly
  ``MIWAE(num_outer=C, num_inner=K')`` here (the engine's groups are the components' blocks,
  when every modality is present), and IWAE_{C K'} is at least as tight (concavity of log).
- "mopoe" / "component" (Sutter et al.): the same draws, but each is scored with the density of
  the component c that drew it: log w = log p(x, z) - log q(z | x_{S_c}). The ELBO is
  (1/C) sum_c ELBO_c, the average of the subsets' ELBOs, each reconstructing every present
  modality: Sutter et al.'s objective (the mixture's KL replaced by the mean of the components'
  KLs, an upper bound of it). Every weight is an unbiased estimate of p(x), so the importance-
  weighted values are bounds too and tend to log p(x). "moe" / "component" is the same for
  MMVAE: the mean of the unimodal ELBOs, each reconstructing all modalities; "mopoe" /
  "mixture" is the MoPoE mixture scored with its density, as MMVAE does.

Stratified sampling. The draws of one datapoint (the engine's particles, or a ``sample_shape``)
are split into C contiguous blocks of (nearly) equal size, one per valid component, after a
random cyclic shift of the components per datapoint: every draw is marginally from the mixture
(so each value is a bound whatever the number of draws, and a single draw is an ordinary draw
of the mixture), and with K a multiple of C each component gets exactly K/C draws. Which draws
came from which component is a function of the shift (drawn by the guide) and the draw's
position, so ``log_prob`` of the "component" objective knows it. Component and draw
position are independent of the parameters, so the reparameterised gradient is the gradient of
the stratified bound; STL's dropped term has mean zero for the stratified ELBO. DReG's
derivation assumes i.i.d. draws from the scoring density: it holds for "component" (each draw
is an ordinary draw of its component), and for "mixture" only with ``stratified=False``
(components drawn independently per draw).

What :meth:`MultimodalVAE.log_likelihood` returns: pvae's importance-sampled estimate of
log p(x) for the joint term alone, with the fusion's q(z | x) scored by its full density (the
mixture's, for "moe" and "mopoe"), whatever the training objective.

Usage (the positional arguments are the modalities in declared order, optionally followed by
a ``(batch, M)`` boolean mask; ``pvae.fit`` passes a tuple of tensors that way)::

    ds = pvae.data.load("digits-labels")                    # (image, one-hot label) tuples
    mm = MultimodalVAE(ds.modalities, z_dim=16, fusion="moe", hidden=(128,))
    pvae.fit(mm.model, mm.guide, ds.train, engine=IWAE(num_particles=4), epochs=50)
    mm.generate({"label": one_hot}, num_samples=20)["image"]    # (20, batch, 64) means
    mask = torch.rand(len(x), 2) < 0.7                      # missing modalities
    pvae.fit(mm.model, mm.guide, (x, y, mask), ...)

Coherence (Shi et al.): :func:`coherence` is the fraction of cross-generated samples that a
classifier assigns the right label; :func:`train_classifier` trains that classifier (a small
MLP, plain PyTorch, Adam on the cross-entropy) on the same data.

The networks are registered with ``pyro.module`` where they are used: decoders and likelihoods
in the model, encoders in the guide.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import likelihoods, nets
from pvae.distributions.mixture import StratifiedMixture
from pvae.evaluate import log_likelihood
from pvae.gaussian import product_of_experts

from ._names import claim

__all__ = [
    "FUSIONS",
    "OBJECTIVES",
    "Modality",
    "MultimodalVAE",
    "StratifiedMixture",
    "coherence",
    "train_classifier",
]

FUSIONS = ("poe", "moe", "mopoe")
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "poe": ("subsampled", "joint"),
    "moe": ("mixture", "component"),
    "mopoe": ("component", "mixture"),
}
"""Valid objectives per fusion; the first is the paper's and the default."""


# ---------------------------------------------------------------------------------------------
# Modalities and objective parts


@dataclass
class Modality:
    """One modality: its dimension, likelihood and networks.

    :param dim: flattened data dimension.
    :param likelihood: a name of :mod:`pvae.likelihoods` ("bernoulli" also serves one-hot
        labels); keywords via ``likelihood_kw``.
    :param hidden: hidden widths of its encoder (the decoder uses them reversed); None takes
        the model's ``hidden``.
    :param net: "mlp" or "conv" (conv needs ``image_shape``).
    """

    dim: int
    likelihood: str = "bernoulli"
    hidden: tuple[int, ...] | None = None
    likelihood_kw: dict[str, Any] | None = None
    net: str = "mlp"
    image_shape: tuple[int, int, int] | None = None


def _as_modality(name: str, spec: Modality | Mapping[str, Any] | int) -> Modality:
    if isinstance(spec, Modality):
        modality = spec
    elif isinstance(spec, Mapping):
        try:
            modality = Modality(**spec)
        except TypeError as error:
            raise ValueError(f"modality {name!r}: bad spec {dict(spec)!r}: {error}") from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        modality = Modality(spec)
    else:
        raise ValueError(
            f"modality {name!r}: expected a Modality, a dict of its fields or an int (the "
            f"dimension), got {type(spec).__name__}"
        )
    if isinstance(modality.dim, bool) or not isinstance(modality.dim, int) or modality.dim < 1:
        raise ValueError(f"modality {name!r}: dim must be a positive int, got {modality.dim!r}")
    return modality


class _Part(NamedTuple):
    """One ELBO term of the objective: a latent site and the modalities it encodes and
    observes (its observed sites are ``name + suffix``)."""

    latent: str
    modalities: tuple[bool, ...]
    suffix: str


# ---------------------------------------------------------------------------------------------
# The model


class MultimodalVAE(PyroModule):
    """A VAE over several named modalities with a PoE, MoE or MoPoE joint posterior.

    :param modalities: name -> :class:`Modality` (or a dict of its fields, or the dimension),
        in the order the model's positional arguments follow.
    :param z_dim: latent dimension (shared by all modalities).
    :param fusion: "poe", "moe" or "mopoe".
    :param objective: see the module docstring; None takes the fusion's paper's objective
        ("subsampled", "mixture", "component").
    :param hidden: default hidden widths of the modalities' MLPs.
    :param activation: activation of the MLPs.
    :param prior_expert: include p(z) in every product of experts.
    :param stratified: stratify the mixture's draws over its components.

    Sites, inside ``pyro.plate("data", batch)``: latent ``"z"``, observed one per modality,
    named after it (plus ``"z|<m>"`` and ``"<m>|<m>"`` for "poe"/"subsampled").
    Arguments of ``model``/``guide``: ``(x_1, ..., x_M)`` with ``x_m (batch, dim_m)``,
    optionally followed by ``mask (batch, M)`` (bool, True where present; also ``mask=``), or
    one dict name -> tensor (absent names are missing for every datapoint).
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality | Mapping[str, Any] | int],
        z_dim: int,
        fusion: str = "poe",
        objective: str | None = None,
        hidden: Sequence[int] = (200, 200),
        activation: type[nn.Module] = nn.ReLU,
        prior_expert: bool = True,
        stratified: bool = True,
        name: str = "multimodal",
    ):
        super().__init__(claim(name, self))
        if not isinstance(modalities, Mapping) or not modalities:
            raise ValueError("modalities must be a non-empty dict name -> Modality")
        for modality_name in modalities:
            if (
                not isinstance(modality_name, str)
                or not modality_name
                or modality_name in ("z", "data")
                or "|" in modality_name
            ):
                raise ValueError(
                    f"modality names must be non-empty strings other than 'z' and 'data' and "
                    f"without '|', got {modality_name!r}"
                )
        if isinstance(z_dim, bool) or not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"z_dim must be a positive int, got {z_dim!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid fusions are: {', '.join(FUSIONS)}")
        objective = OBJECTIVES[fusion][0] if objective is None else objective
        if objective not in OBJECTIVES[fusion]:
            raise ValueError(
                f"unknown objective {objective!r} for fusion {fusion!r}; valid objectives "
                f"are: {', '.join(OBJECTIVES[fusion])}"
            )
        if fusion != "poe" and objective == "component" and not stratified:
            raise ValueError("objective='component' needs stratified=True")
        self.names: tuple[str, ...] = tuple(modalities)
        self.specs = {n: _as_modality(n, spec) for n, spec in modalities.items()}
        self.z_dim, self.fusion, self.objective = z_dim, fusion, objective
        self.prior_expert, self.stratified = bool(prior_expert), bool(stratified)
        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        self.likelihoods = nn.ModuleDict()
        for n, spec in self.specs.items():
            widths = tuple(hidden if spec.hidden is None else spec.hidden)
            likelihood = likelihoods.get(spec.likelihood, spec.dim, **(spec.likelihood_kw or {}))
            self.likelihoods[n] = likelihood
            self.encoders[n] = nets.build_encoder(
                spec.net, spec.dim, z_dim, widths, spec.image_shape, activation
            )
            self.decoders[n] = nets.build_decoder(
                spec.net,
                z_dim,
                spec.dim,
                tuple(reversed(widths)),
                likelihood.param_size,
                spec.image_shape,
                activation,
            )
        # The mixture's components: subsets of the modalities, the empty one (p(z), used only
        # when nothing is present) first. "moe": the singletons; "mopoe": all of them.
        num = len(self.names)
        if fusion == "moe":
            rows = [[False] * num] + [[i == m for i in range(num)] for m in range(num)]
        else:
            rows = [list(bits) for bits in itertools.product([False, True], repeat=num)]
            rows.sort(key=sum)
        self.register_buffer("subsets", torch.tensor(rows, dtype=torch.bool), persistent=False)

    # -- the objective as sites -----------------------------------------------------------------
    @property
    def parts(self) -> tuple[_Part, ...]:
        """The ELBO terms of the training objective (the joint one first)."""
        everything = (True,) * len(self.names)
        joint = _Part("z", everything, "")
        if self.fusion != "poe" or self.objective != "subsampled" or len(self.names) == 1:
            return (joint,)
        unimodal = [
            _Part(f"z|{n}", tuple(i == m for i in range(len(self.names))), f"|{n}")
            for m, n in enumerate(self.names)
        ]
        return (joint, *unimodal)

    def _inputs(
        self, data: tuple[Any, ...], mask: Tensor | None
    ) -> tuple[list[Tensor], Tensor | None]:
        """The modalities ``(batch, dim_m)`` (missing entries zeroed) and the presence mask
        ``(batch, M)`` (None when every modality is present)."""
        names, num = self.names, len(self.names)
        given_cols: list[bool] | None = None
        if len(data) == 1 and isinstance(data[0], Mapping):
            given = dict(data[0])
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise ValueError(f"unknown modalities {unknown}; this model has {list(names)}")
            tensors = [t for t in given.values() if t is not None]
            if not tensors:
                raise ValueError("the dict of modalities gives none of them")
            first = tensors[0]
            if not isinstance(first, Tensor) or first.dim() != 2:
                raise ValueError(f"modalities must be (batch, dim) tensors, got {first!r}")
            given_cols = [given.get(n) is not None for n in names]
            xs = [
                given[n] if ok else first.new_zeros(first.shape[0], self.specs[n].dim)
                for n, ok in zip(names, given_cols, strict=True)
            ]
        else:
            if len(data) == num + 1 and mask is None:
                *rest, mask = data
                data = tuple(rest)
            if len(data) != num:
                raise ValueError(
                    f"expected the {num} modalities ({', '.join(names)}) as positional tensors, "
                    f"optionally followed by a (batch, {num}) mask, got {len(data)} arguments"
                )
            xs = list(data)
        batch = None
        for n, x in zip(names, xs, strict=True):
            dim = self.specs[n].dim
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != dim:
                raise ValueError(
                    f"modality {n!r} must have shape (batch, {dim}), got "
                    f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}"
                )
            if batch is not None and x.shape[0] != batch:
                raise ValueError(
                    f"the modalities must have the same batch size; {n!r} has {x.shape[0]}, "
                    f"the first {batch}"
                )
            batch = x.shape[0]
        assert batch is not None
        present: Tensor | None = None
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.shape != (batch, num):
                raise ValueError(
                    f"mask must be a (batch, {num}) tensor (True where a modality is present), "
                    f"got {tuple(getattr(mask, 'shape', ())) or type(mask).__name__}"
                )
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must be boolean (or hold only 0 and 1)")
            present = mask.bool()
        if given_cols is not None and not all(given_cols):
            cols = torch.tensor(given_cols, device=xs[0].device).expand(batch, num)
            present = cols if present is None else present & cols
        if present is not None:
            xs = [
                torch.where(present[:, m : m + 1], x, torch.zeros((), dtype=x.dtype))
                for m, x in enumerate(xs)
            ]
        return xs, present

    def _experts(self, xs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Every modality's expert: loc and scale, each ``(batch, M, z_dim)``."""
        out = [self.encoders[n](x) for n, x in zip(self.names, xs, strict=True)]
        return torch.stack([loc for loc, _ in out], -2), torch.stack([s for _, s in out], -2)

    def _products(self, loc: Tensor, scale: Tensor, members: Tensor) -> tuple[Tensor, Tensor]:
        """Products of experts p(z) prod_{m: members[..., m]} q~_m: ``members (batch, C, M)``
        -> loc and scale ``(batch, C, z_dim)``. The empty product is p(z)."""
        prior_weight: Tensor | float = 1.0
        if not self.prior_expert:  # the prior only in the empty product
            prior_weight = (~members.any(-1, keepdim=True)).to(loc.dtype)
        return product_of_experts(
            loc[:, None],  # (batch, 1, M, z_dim)
            scale[:, None],
            weights=members[..., None],  # (batch, C, M, 1)
            prior=(0.0, 1.0),
            prior_weight=prior_weight,
        )

    def _posterior(
        self, loc: Tensor, scale: Tensor, available: Tensor, density: str
    ) -> TorchDistributionMixin:
        """q(z | x) from the experts ``(batch, M, z_dim)`` of the ``available (batch, M)``
        modalities: the product ("poe") or the mixture over subsets of them."""
        if self.fusion == "poe":
            q_loc, q_scale = self._products(loc, scale, available[:, None, :])
            return dist.Normal(q_loc[:, 0], q_scale[:, 0]).to_event(1)
        subsets = self.subsets.to(available.device)
        members = subsets[None] & available[:, None]  # (batch, C, M)
        nonempty = subsets.any(-1)  # (C,)
        inside = (subsets[None] <= available[:, None]).all(-1)  # S ⊆ P, (batch, C)
        nothing = ~available.any(-1, keepdim=True)  # (batch, 1)
        valid = (inside & nonempty) | (~nonempty & nothing)
        q_loc, q_scale = self._products(loc, scale, members)
        shift = torch.rand(loc.shape[:1], dtype=loc.dtype, device=loc.device)
        return StratifiedMixture(q_loc, q_scale, valid, shift, density, self.stratified)

    def _available(self, present: Tensor | None, part: _Part, like: Tensor) -> Tensor:
        cols = torch.tensor(part.modalities, device=like.device)
        if present is None:
            return cols.expand(like.shape[0], len(self.names))
        return present & cols

    def _prior(self, like: Tensor) -> TorchDistributionMixin:
        return dist.Normal(like.new_zeros(like.shape[0], self.z_dim), 1.0).to_event(1)

    def _model(self, xs: list[Tensor], present: Tensor | None, parts: Sequence[_Part]) -> None:
        for n in self.names:
            pyro.module(f"{self._pyro_name}.decoders.{n}", self.decoders[n])
            pyro.module(f"{self._pyro_name}.likelihoods.{n}", self.likelihoods[n])
        with pyro.plate("data", xs[0].shape[0]):
            for part in parts:
                z = pyro.sample(part.latent, self._prior(xs[0]))
                for m, n in enumerate(self.names):
                    if not part.modalities[m]:
                        continue
                    x_dist = self.likelihoods[n](self.decoders[n](z)).to_event(1)
                    if present is not None:
                        x_dist = x_dist.mask(present[:, m])
                    pyro.sample(n + part.suffix, x_dist, obs=xs[m])

    def _guide(
        self, xs: list[Tensor], present: Tensor | None, parts: Sequence[_Part], density: str
    ) -> None:
        for n in self.names:
            pyro.module(f"{self._pyro_name}.encoders.{n}", self.encoders[n])
        loc, scale = self._experts(xs)
        with pyro.plate("data", xs[0].shape[0]):
            for part in parts:
                available = self._available(present, part, xs[0])
                pyro.sample(part.latent, self._posterior(loc, scale, available, density))

    @property
    def _density(self) -> str:
        return "component" if self.objective == "component" else "mixture"

    def model(self, *data: Any, mask: Tensor | None = None) -> None:
        """p(x, z) (one term per part of the objective); masked modalities are not observed."""
        xs, present = self._inputs(data, mask)
        self._model(xs, present, self.parts)

    def guide(self, *data: Any, mask: Tensor | None = None) -> None:
        """q(z | x) by the fusion (and q(z | x_m) for the unimodal terms of "subsampled")."""
        xs, present = self._inputs(data, mask)
        self._guide(xs, present, self.parts, self._density)

    # -- evaluation -----------------------------------------------------------------------------
    def log_likelihood(
        self,
        *data: Tensor,
        mask: Tensor | None = None,
        num_samples: int = 1000,
        batch_size: int = 100,
        **kwargs: Any,
    ) -> Tensor:
        """Importance-sampled log p(x_n) of the present modalities, ``(N,)``, nats.

        :func:`pvae.log_likelihood` on the joint term alone, the fusion's q(z | x) as proposal
        scored with its full density (the mixture's for "moe" and "mopoe"), whatever the
        training objective. ``data`` as for :meth:`model` (tensors, optionally a mask).
        """
        joint = self.parts[:1]
        xs, present = self._inputs(data, mask)
        batch = (*xs, present) if present is not None else tuple(xs)

        def model(*args: Tensor) -> None:
            self._model(*self._inputs(args, None), joint)

        def guide(*args: Tensor) -> None:
            self._guide(*self._inputs(args, None), joint, "mixture")

        return log_likelihood(
            model, guide, batch, num_samples=num_samples, batch_size=batch_size, **kwargs
        )

    # -- conveniences (no engine needs them) ----------------------------------------------------
    @torch.no_grad()
    def posterior(self, *data: Any, mask: Tensor | None = None) -> TorchDistributionMixin:
        """The joint posterior q(z | x) of the present modalities (batch shape ``(batch,)``,
        event ``(z_dim,)``); a dict of some modalities gives q(z | x_S)."""
        xs, present = self._inputs(data, mask)
        loc, scale = self._experts(xs)
        available = self._available(present, self.parts[0], xs[0])
        return self._posterior(loc, scale, available, "mixture")

    @torch.no_grad()
    def encode(self, *data: Any, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(z | x), each ``(batch, z_dim)``."""
        q = self.posterior(*data, mask=mask)
        return q.mean, q.variance.sqrt()

    def _mean(self, name: str, z: Tensor) -> Tensor:
        likelihood = self.likelihoods[name]
        assert isinstance(likelihood, likelihoods.Likelihood)
        return likelihood.mean(self.decoders[name](z))

    @torch.no_grad()
    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Means of p(x_m | z) for every modality, ``(..., dim_m)`` each."""
        return {n: self._mean(n, z) for n in self.names}

    @torch.no_grad()
    def sample(self, num_samples: int) -> dict[str, Tensor]:
        """Means of p(x_m | z), z from the prior: ``(num_samples, dim_m)`` per modality."""
        dtype = next(self.decoders.parameters()).dtype
        return self.decode(torch.randn(num_samples, self.z_dim, dtype=dtype))

    @torch.no_grad()
    def generate(self, given: Mapping[str, Tensor], num_samples: int = 1) -> dict[str, Tensor]:
        """Cross-modal generation: means of p(x_m | z), z ~ q(z | x_S), for the modalities m
        not in ``given`` (name -> ``(batch, dim)``): ``(num_samples, batch, dim_m)`` each. The
        draws are stratified over the mixture's components."""
        if not given:
            raise ValueError("give at least one modality (sample() draws from the prior)")
        q = self.posterior(dict(given))
        z = q.rsample(torch.Size([num_samples]))
        return {n: self._mean(n, z) for n in self.names if n not in given}

    @torch.no_grad()
    def reconstruct(self, *data: Any, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Means of p(x_m | z) at the mean of q(z | x), ``(batch, dim_m)`` per modality."""
        return self.decode(self.encode(*data, mask=mask)[0])


# ---------------------------------------------------------------------------------------------
# Coherence


def train_classifier(
    x: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    hidden: Sequence[int] = (128,),
    epochs: int = 30,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """A small MLP classifier ``(..., x_dim) -> logits (..., num_classes)`` trained with Adam
    on the cross-entropy (plain PyTorch; torch's global RNG is left as it was).

    :param x: ``(N, x_dim)`` inputs (e.g. the images of a multimodal set's train split).
    :param labels: ``(N,)`` integer labels.
    """
    if x.dim() != 2 or labels.shape != x.shape[:1]:
        raise ValueError(
            f"x must be (N, x_dim) and labels (N,), got {tuple(x.shape)}, {tuple(labels.shape)}"
        )
    labels = labels.long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nets.MLP(x.shape[1], tuple(hidden), num_classes).to(x.dtype)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0])
            for start in range(0, x.shape[0], batch_size):
                index = order[start : start + batch_size]
                loss = nn.functional.cross_entropy(classifier(x[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier


@torch.no_grad()
def coherence(
    mm: MultimodalVAE,
    given: Mapping[str, Tensor],
    target: str,
    labels: Tensor,
    classifier: nn.Module | None = None,
    num_samples: int = 1,
) -> float:
    """The fraction of cross-generated ``target`` samples that ``classifier`` assigns the right
    label (Shi et al. 2019's cross coherence).

    :param given: name -> ``(batch, dim)``, the conditioning modalities.
    :param target: the generated modality (not in ``given``).
    :param labels: ``(batch,)`` the true labels.
    :param classifier: maps ``(..., dim_target)`` to logits; None takes the argmax of the
        generated values themselves (for a one-hot label modality).
    :param num_samples: draws of z per datapoint (stratified over the mixture's components).
    """
    if target in given or target not in mm.names:
        raise ValueError(f"target must be a modality of the model not in given, got {target!r}")
    generated = mm.generate(given, num_samples)[target]  # (S, batch, dim)
    scores = generated if classifier is None else classifier(generated)
    predicted = scores.argmax(-1)
    return float((predicted == labels.to(predicted.device)).double().mean())


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import Choice, ModelCard, Option  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402


def _build(
    ds: Splits, z_dim: int, hidden: Sequence[int], net: str, likelihood: str, fusion: str
) -> MultimodalVAE:
    require_mlp("multimodal", net)
    modalities = getattr(ds, "modalities", None)
    if not modalities:
        raise ValueError(f"dataset {ds.name!r} names no modalities")
    return MultimodalVAE(dict(modalities), z_dim=z_dim, fusion=fusion, hidden=tuple(hidden))


def _first_modality(model: MultimodalVAE) -> Any:
    first = model.names[0]

    def decode(z: Tensor) -> Tensor:
        return model.decode(z)[first]

    return decode


def _multimodal_metrics(
    model: MultimodalVAE, ds: Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """Cross coherence (Shi et al. 2019) for every ordered pair of modalities, when the data
    set has labels (``<split>_labels``, or a one-hot ``label`` modality): the fraction of
    samples of the target modality, generated from the source alone, whose label is right. A
    one-hot label modality is read by its argmax; any other target by a small classifier
    trained on the train split (seeded)."""
    from pvae.evaluate import as_tensors

    names = list(model.names)
    parts = {
        n: dict(zip(names, as_tensors(getattr(ds, s)), strict=True))
        for n, s in (("train", "train"), (split, split))
    }

    def labels_of(which: str):
        given = getattr(ds, f"{which}_labels", None)
        if given is not None:
            return torch.as_tensor(given).long()
        if "label" in names:
            return parts[which]["label"].argmax(-1)
        return None

    labels, train_labels = labels_of(split), labels_of("train")
    if labels is None or train_labels is None or len(names) < 2:
        return {}
    metrics: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for target in names:
            classifier = None
            if target != "label":
                classifier = train_classifier(parts["train"][target], train_labels, seed=seed)
            for source in names:
                if source != target:
                    given = {source: parts[split][source]}
                    value = coherence(model, given, target, labels, classifier)
                    metrics[f"coherence_{source}_to_{target}"] = value
    return metrics


CARD = ModelCard(
    name="multimodal",
    description="multimodal VAE over paired modalities, PoE/MoE/MoPoE posterior",
    factory=_build,
    accepts=("multimodal",),
    options=(Option.of(MultimodalVAE, "fusion", Choice(FUSIONS), help="joint posterior"),),
    capabilities=("sample",),
    decoder=_first_modality,
    metrics=_multimodal_metrics,
)
