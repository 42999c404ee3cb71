"""Hierarchical VAEs with L stochastic layers: the Ladder VAE (Sønderby et al. 2016) and the
plain bottom-up guide of Burda et al. (2016).

Generative story, for each datapoint n (layer 1 is next to x, layer L at the top):

    z_L ~ N(0, I)
    z_l | z_{l+1} ~ N(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)          l = L-1, ..., 1
    x | z_1 ~ p_theta(x | decoder(z_1))          (likelihood chosen by name)

Inference networks (guides), ``inference=``:

- ``"ladder"`` (Sønderby et al. 2016). A deterministic bottom-up pass d_0 = x,
  d_l = f_l(d_{l-1}) gives each layer's own evidence N(mu_hat_l, sigma_hat_l^2). Then,
  top-down, q(z_L | x) = N(mu_hat_L, sigma_hat_L^2) and, for l < L, the evidence is merged
  with the generative top-down prior evaluated at the guide's sample of z_{l+1}
  (mu_p, sigma_p = mu_l(z_{l+1}), sigma_l(z_{l+1})) by precision weighting:

      sigma_q^2 = 1 / (sigma_hat^-2 + sigma_p^-2)
      mu_q      = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2) sigma_q^2

  q(z | x) = q(z_L | x) prod_{l<L} q(z_l | z_{l+1}, x): the guide samples top-down, in the
  model's order, so the ELBO engine uses analytic per-layer KLs (conditional on the sampled
  parent).
- ``"bottom-up"``: a Markov chain upward, q(z_1 | x) prod_{l>1} q(z_l | z_{l-1}), each an
  MLP with a diagonal Gaussian head (Burda et al.'s two-layer architecture). The guide
  samples z_1 first, the model z_L first, so the ELBO engine falls back to Monte-Carlo KL
  estimates (the model declares it, :attr:`HierarchicalVAE.monte_carlo_kl`, so the engine's
  warning about the order, meant for pairs where it is a mistake, stays silent).

Latent sites, each inside ``pyro.plate("data")`` and each a ``Normal(...).to_event(1)``
over ``(batch, z_dims[l - 1])``: ``"z1"`` (bottom, next to x), ``"z2"``, ..., ``"zL"`` (top);
``HierarchicalVAE.layer_sites`` lists them bottom to top. The observed site is ``"x"``.
Generic diagnostics read KL and activity per layer from these sites.

Which parameters belong to whom. The decoder, the likelihood and the top-down networks
(mu_l, sigma_l) are registered in the model with ``pyro.module``; the guide registers its
bottom-up networks, and the ladder guide registers the top-down networks too, because it
evaluates the prior there. Engines read the model/guide split from the traces and count a
parameter that appears in both as the model's. Consequences for the ladder guide:

- PIWAE: the top-down networks follow the model's objective (IWAE_{MK}) only; the guide's
  MIWAE/ELBO gradient reaches only the bottom-up networks.
- ``estimator="stl"`` or ``"dreg"``: log q is evaluated with all of its parameters detached,
  the shared top-down ones included, so those receive the path gradient without the score
  term (as STL does), which for K > 1 is not the unbiased IWAE gradient of the shared
  networks. Use ``estimator="reparam"`` or ``inference="bottom-up"`` (no shared parameters)
  where this matters.

Per-layer beta and warm-up. ``beta=(b_1, ..., b_L)`` scales each layer's site in both the
model and the guide (``pyro.poutine.scale``; ``poutine.mask(False)`` for ``b_l = 0``), which
multiplies that layer's KL term (for importance-weighted engines: its log p - log q in the
weights) by ``b_l``. The value engines then report is the weighted objective, no longer a
bound: set ``hvae.beta = None`` (all ones) before ``pvae.log_likelihood`` or a comparison.
KL warm-up (Sønderby et al.: beta from 0 to 1 over the first epochs, every layer together)
is the engine's job: ``pvae.inference.ELBO(beta=LinearAnnealing(num_steps))``, or
:func:`warmup`; it multiplies every layer's KL and leaves the reported bound plain.

Measured on MNIST-5k (4,000 training images; z = (50, 20), 784-200-200 / 100-100 MLPs, against
the VAE 784-200-200-50; test log p(x) with K = 200; see tests/models/test_hierarchical.py):
with 40 epochs the bottom-up guide ties with the one-layer VAE (within ~1 nat over 3 seeds)
and the ladder guide is 3-17 nats behind; with 250 epochs (Adam 1e-3, 20 epochs of warm-up)
VAE -100.1, bottom-up -101.0 (its training ELBO is the better one: -95.3 against -96.1, so it
overfits the small set more), ladder -113.2 (training ELBO -101.4). The ladder guide starts
with q(z_1) half-way to a prior whose mean moves with the sampled z_2 and settles with little
information in z_1; warm-up is essential for it (without: -134 against -115 at 50 epochs),
and Sønderby et al. also used batch normalisation and far longer training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import likelihoods, nets
from pvae.gaussian import product_of_experts
from pvae.inference import ELBO, LinearAnnealing

from ._names import claim

__all__ = ["HierarchicalVAE", "precision_weighted", "warmup"]

INFERENCE = ("ladder", "bottom-up")


def precision_weighted(
    loc_a: Tensor, scale_a: Tensor, loc_b: Tensor, scale_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Normalised product of two diagonal Gaussians N(loc_a, scale_a^2) N(loc_b, scale_b^2).

    ``var = 1 / (scale_a^-2 + scale_b^-2)``, ``loc = (loc_a scale_a^-2 + loc_b scale_b^-2) var``
    (:func:`pvae.gaussian.product_of_experts` with b as the prior expert). Shapes broadcast;
    returns ``(loc, scale)``.
    """
    return product_of_experts(loc_a.unsqueeze(-2), scale_a.unsqueeze(-2), prior=(loc_b, scale_b))


def warmup(num_steps: int, **elbo_kwargs) -> ELBO:
    """The ELBO with linear KL warm-up: beta rises from 0 to 1 over ``num_steps`` steps, for
    every layer at once (Sønderby et al. 2016). The reported bound stays the plain ELBO."""
    return ELBO(beta=LinearAnnealing(num_steps), **elbo_kwargs)


def _widths(entry: int | Sequence[int], name: str) -> tuple[int, ...]:
    widths = (entry,) if isinstance(entry, int) else tuple(entry)
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {entry!r}")
    return widths


class HierarchicalVAE(PyroModule):
    """A VAE with ``L = len(z_dims)`` stochastic layers of MLPs.

    :param x_dim: data dimension (flattened).
    :param z_dims: latent sizes bottom to top, ``(dim z_1, ..., dim z_L)``.
    :param hidden: one entry per layer: the hidden widths of the deterministic block below
        layer ``l`` (an int is one hidden layer, ``()`` none: a linear map). Bottom-up, block
        ``l`` maps ``d_{l-1}`` (``x`` for ``l = 1``; ``z_{l-1}`` for the bottom-up guide) to
        layer ``l``'s Gaussian; top-down, the generative nets mirror it with reversed widths:
        ``z_{l+1} -> z_l`` uses ``hidden[l]``, the decoder ``z_1 -> x`` uses ``hidden[0]``.
    :param likelihood: "bernoulli", "continuous_bernoulli", "gaussian", "poisson",
        "categorical" (see :mod:`pvae.likelihoods`; extra keywords via ``likelihood_kw``).
    :param inference: "bottom-up" (default: the better of the two on MNIST-5k, see above) or
        "ladder" (precision-weighted top-down merge).
    :param beta: per-layer KL weights ``(b_1, ..., b_L)`` (non-negative), or None for all
        ones. Mutable: set ``hvae.beta = None`` before evaluating a bound.
    :param activation: activation class of every MLP.

    ``layer_sites`` is ``("z1", ..., "zL")``, bottom to top.
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int] = (64, 32),
        hidden: Sequence[int | Sequence[int]] = ((256, 256), (128, 128)),
        likelihood: str = "bernoulli",
        inference: str = "bottom-up",
        beta: Sequence[float] | None = None,
        activation: type[nn.Module] = nn.ReLU,
        likelihood_kw: dict | None = None,
        name: str = "hvae",
    ):
        super().__init__(claim(name, self))
        z_dims = tuple(z_dims)
        if not z_dims or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in z_dims
        ):
            raise ValueError(f"z_dims must be a non-empty sequence of positive ints, got {z_dims}")
        if len(hidden) != len(z_dims):
            raise ValueError(
                f"hidden needs one entry per stochastic layer ({len(z_dims)}), got {len(hidden)}"
            )
        if inference not in INFERENCE:
            raise ValueError(f"unknown inference {inference!r}; choose one of {INFERENCE}")
        widths = [_widths(h, f"hidden[{i}]") for i, h in enumerate(hidden)]
        self.x_dim, self.z_dims, self.inference = x_dim, z_dims, inference
        self.layer_sites = tuple(f"z{layer}" for layer in range(1, len(z_dims) + 1))
        self.beta = beta  # validated by the setter below

        self.likelihood = likelihoods.get(likelihood, x_dim, **(likelihood_kw or {}))
        self.decoder = nets.MLPDecoder(
            z_dims[0], x_dim * self.likelihood.param_size, widths[0][::-1], activation
        )
        # top_down[l - 1]: z_{l+1} -> (mu_l, sigma_l), l = 1 .. L-1
        self.top_down = nn.ModuleList(
            nets.MLPEncoder(z_dims[i + 1], z_dims[i], widths[i + 1][::-1], activation)
            for i in range(len(z_dims) - 1)
        )
        # bottom_up[l - 1]: the block below layer l; its body gives d_l, its head layer l's
        # Gaussian (ladder: from d_{l-1}; bottom-up guide: from z_{l-1}).
        inputs = [x_dim]
        for i in range(len(z_dims) - 1):
            if inference == "bottom-up":
                inputs.append(z_dims[i])
            else:  # the width of d_{l}: its block's last hidden layer, or d_{l-1}'s
                inputs.append(widths[i][-1] if widths[i] else inputs[-1])
        self.bottom_up = nn.ModuleList(
            nets.MLPEncoder(inputs[i], z_dims[i], widths[i], activation) for i in range(len(z_dims))
        )

    # -- per-layer beta -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.z_dims)

    @property
    def beta(self) -> tuple[float, ...] | None:
        return self._beta

    @beta.setter
    def beta(self, value: Sequence[float] | None) -> None:
        if value is not None:
            value = tuple(float(b) for b in value)
            if len(value) != len(self.z_dims) or any(not b >= 0 for b in value):
                raise ValueError(
                    f"beta must be None or {len(self.z_dims)} non-negative floats (one per "
                    f"layer, bottom to top), got {value}"
                )
        self._beta = value

    def _weighted(self, layer: int) -> contextlib.AbstractContextManager:
        """Scale layer ``layer``'s site by its beta (mask it out for beta = 0)."""
        beta = 1.0 if self._beta is None else self._beta[layer - 1]
        if beta == 1.0:
            return contextlib.nullcontext()
        if beta == 0.0:
            return poutine.mask(mask=False)
        return poutine.scale(scale=beta)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(
                f"HierarchicalVAE expects x of shape (batch, {self.x_dim}), got {tuple(x.shape)}"
            )

    @property
    def monte_carlo_kl(self) -> bool:
        """True for the bottom-up guide: it samples z_1 first and the model z_L first, so the
        ELBO engine uses Monte-Carlo KL estimates by design (declared, so it does not warn;
        :func:`pvae.protocol.declares_monte_carlo_kl`)."""
        return self.inference == "bottom-up"

    def shared_parameters(self) -> tuple[str, ...]:
        """The ladder guide evaluates the model's top-down networks (the prior it merges with
        the evidence): declared shared (:func:`pvae.protocol.declared_shared`)."""
        if self.inference == "ladder" and len(self.top_down):
            return (f"{self._pyro_name}.top_down",)
        return ()

    # -- the pair -------------------------------------------------------------------------------
    def model(self, x: Tensor) -> None:
        """p(x, z_1, ..., z_L) for a batch ``x`` of shape ``(batch, x_dim)``."""
        self._check(x)
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        if len(self.top_down):
            pyro.module(f"{self._pyro_name}.top_down", self.top_down)
        top = self.num_layers
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[:1] + (self.z_dims[-1],))
            with self._weighted(top):
                z = pyro.sample(f"z{top}", dist.Normal(loc, 1.0).to_event(1))
            for layer in range(top - 1, 0, -1):
                loc, scale = self.top_down[layer - 1](z)
                with self._weighted(layer):
                    z = pyro.sample(f"z{layer}", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        """q(z_1, ..., z_L | x) for a batch ``x`` of shape ``(batch, x_dim)``."""
        self._check(x)
        pyro.module(f"{self._pyro_name}.bottom_up", self.bottom_up)
        if self.inference == "bottom-up":
            with pyro.plate("data", x.shape[0]):
                z = x
                for layer, block in enumerate(self.bottom_up, start=1):
                    loc, scale = block(z)
                    with self._weighted(layer):
                        z = pyro.sample(f"z{layer}", dist.Normal(loc, scale).to_event(1))
            return
        if len(self.top_down):
            pyro.module(f"{self._pyro_name}.top_down", self.top_down)
        with pyro.plate("data", x.shape[0]):
            evidence = self._bottom_up_pass(x)
            top = self.num_layers
            loc, scale = evidence[-1]
            with self._weighted(top):
                z = pyro.sample(f"z{top}", dist.Normal(loc, scale).to_event(1))
            for layer in range(top - 1, 0, -1):
                prior_loc, prior_scale = self.top_down[layer - 1](z)
                loc, scale = precision_weighted(*evidence[layer - 1], prior_loc, prior_scale)
                with self._weighted(layer):
                    z = pyro.sample(f"z{layer}", dist.Normal(loc, scale).to_event(1))

    def _bottom_up_pass(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Ladder: each layer's evidence ``(mu_hat_l, sigma_hat_l)``, bottom to top."""
        evidence = []
        d = x
        for block in self.bottom_up:
            assert isinstance(block, nets.MLPEncoder)
            d = block.body(d)
            evidence.append(block.head(d))
        return evidence

    # -- conveniences (no engine needs them) --------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's guide mean and standard deviation, bottom (z_1) to top (z_L), each
        ``(batch, z_dims[l - 1])``; a layer conditioned on another is evaluated at that
        layer's mean (top-down for the ladder, bottom-up for the bottom-up guide)."""
        if self.inference == "bottom-up":
            out: list[tuple[Tensor, Tensor]] = []
            z = x
            for block in self.bottom_up:
                loc, scale = block(z)
                out.append((loc, scale))
                z = loc
            return out
        evidence = self._bottom_up_pass(x)
        out = [evidence[-1]]
        for layer in range(self.num_layers - 1, 0, -1):
            prior = self.top_down[layer - 1](out[0][0])
            out.insert(0, precision_weighted(*evidence[layer - 1], *prior))
        return out

    @torch.no_grad()
    def decode(self, z1: Tensor) -> Tensor:
        """Mean of p(x | z_1) for ``z1`` of shape ``(..., z_dims[0])``; ``(..., x_dim)``."""
        return self.likelihood.mean(self.decoder(z1))

    @torch.no_grad()
    def _ancestral(self, z: Tensor, layer: int) -> Tensor:
        """Draw z_{layer-1}, ..., z_1 below a given ``z`` of layer ``layer``; returns z_1."""
        for below in range(layer - 1, 0, -1):
            loc, scale = self.top_down[below - 1](z)
            z = loc + scale * torch.randn_like(loc)
        return z

    def _standard_normal(self, num_samples: int) -> Tensor:
        """A draw of z_L from the prior, ``(num_samples, z_dims[-1])``, on the nets' device."""
        like = next(self.decoder.parameters())
        return torch.randn(num_samples, self.z_dims[-1], dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """Means of p(x | z_1) for ancestral draws from the prior, ``(num_samples, x_dim)``."""
        top = self._standard_normal(num_samples)
        return self.decode(self._ancestral(top, self.num_layers))

    @torch.no_grad()
    def sample_layer(self, layer: int, num_samples: int, z: Tensor | None = None) -> Tensor:
        """Samples sharing one value of z_``layer``, with the layers below drawn afresh.

        ``z`` (shape ``(z_dims[layer - 1],)``) fixes that value; by default it is one ancestral
        draw from the prior. ``layer = L`` fixes the top and varies everything below (the
        per-layer pictures of Sønderby et al.); ``layer = 1`` gives identical means.
        Returns means of p(x | z_1), ``(num_samples, x_dim)``.
        """
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        if z is None:
            top = self._standard_normal(1)
            for above in range(self.num_layers - 1, layer - 1, -1):
                loc, scale = self.top_down[above - 1](top)
                top = loc + scale * torch.randn_like(loc)
            z = top[0]
        if z.shape != (self.z_dims[layer - 1],):
            raise ValueError(
                f"z for layer {layer} must have shape ({self.z_dims[layer - 1]},), got "
                f"{tuple(z.shape)}"
            )
        return self.decode(self._ancestral(z.expand(num_samples, -1), layer))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x | z_1) at the guide's mean of z_1 (:meth:`encode`), ``(batch, x_dim)``."""
        return self.decode(self.encode(x)[0][0])


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

import inspect  # noqa: E402

from pvae.app.registry import Choice, Integer, ModelCard, Option  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    layers: int,
    inference: str,
) -> HierarchicalVAE:
    require_mlp("hvae", net)
    z_dims = tuple(max(1, z_dim // 2**layer) for layer in range(layers))
    return HierarchicalVAE(
        x_dim=ds.x_dim,
        z_dims=z_dims,
        hidden=tuple(tuple(hidden) for _ in range(layers)),
        likelihood=likelihood,
        inference=inference,
    )


CARD = ModelCard(
    name="hvae",
    description="hierarchical VAE, --z-dim halving per layer up (Sonderby et al. 2016)",
    factory=_build,
    options=(
        Option(  # as many layers as the constructor's default z_dims
            "layers",
            Integer(1),
            len(inspect.signature(HierarchicalVAE).parameters["z_dims"].default),
            "stochastic layers",
        ),
        Option.of(HierarchicalVAE, "inference", Choice(INFERENCE), help="guide"),
    ),
    capabilities=("sample",),
)
