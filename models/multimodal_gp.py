"""The multimodal Gaussian-process VAE, MM-GPVAE (Gondur et al. 2024).

Trials of T evenly spaced time bins (step ``dt``) with two modalities: spike counts of
``num_neurons`` neurons and an image per bin. The latent paths, each channel a Gaussian process
over time, fall into three groups:

    z_s (T, Ls)   shared: drives both modalities
    z_n (T, Ln)   neural-private: drives only the spike counts
    z_i (T, Li)   image-private: drives only the images

Generative story, for each trial (one datapoint of ``pyro.plate("data")``)::

    z = [z_s, z_n, z_i] ~ GP prior over time, every channel independent      (site "z")
    y_t  | z_t ~ Poisson(exp(C [z_s,t, z_n,t] + d))        neural modality    (site "neural")
    x_t  | z_t ~ p_theta(x_t | g_theta([z_s,t, z_i,t]))     image modality     (site "image")

with C, d a GPFA-style linear loading (``neural_decoder``) and g_theta an MLP per frame with a
likelihood chosen by name (continuous Bernoulli by default).

Fourier-domain prior (:class:`FourierRBFPrior`, the paper's parameterisation). The trial is
padded to ``T' = T + P`` bins so that the periodic wrap-around of the Fourier basis stays
``P`` bins away, and each channel is written in the real orthonormal Fourier basis of the
padded grid, ``z = B c`` with ``B (T, K)`` the first T rows (DC, cos/sin pairs, Nyquist).
Poisson summation makes the periodised RBF kernel ``k(tau) = s^2 exp(-tau^2 / (2 l^2))`` on the
padded circle diagonal in that basis, with per-coefficient variance

    lambda_k = S(w_k) / dt,   S(w) = s^2 sqrt(2 pi) l exp(-2 pi^2 l^2 w^2),   w_k = k / (T' dt)

(w in cycles per time unit, S the kernel's spectral density), so the prior over coefficients
is ``c ~ N(0, diag(lambda))`` and ``B diag(lambda) B^T`` equals the RBF kernel matrix up to the
wrap-around error ``s^2 exp(-P^2 dt^2 / (2 l^2))`` (about 3e-4 s^2 with the default
``P = 4 l``). Frequencies above ``max_frequency`` (where ``S(w) / S(0) < 1e-8``) are dropped:
K is much smaller than T', the paper's saving. The lengthscales are learned per channel
(``s = 1``: the decoders carry the scale); the padding (from the longest) and the cut-off (from
the shortest) are recomputed from the current lengthscales, so the prior stays the RBF GP it
reports at any lengthscale it learns (K changes with them).

Inference network (guide). A per-bin encoder of each modality gives Gaussian potentials
``N(m_t | z_t, diag v_t)`` on the channels that modality drives; the modalities present in a
trial are fused per bin by a product of Gaussian experts (:func:`pvae.gaussian.product_of_experts`:
precisions add on the shared channels), and the guide is the prior times the fused potentials,
normalised exactly in the coefficient domain::

    q(c_j) = N(P_j^{-1} h_j, P_j^{-1}),   P_j = diag(1 / lambda_j) + B^T diag(1 / v_{.,j}) B,
                                          h_j = B^T (m_{.,j} / v_{.,j})

one ``K x K`` Gaussian per trial and channel (K ~ 2 T' l_min^-1, small). A modality missing from
a trial (``modality_mask[n, m]`` False) gives no potential (its private channels keep the prior)
and no likelihood term.

Neural likelihood. The ``"neural"`` site scores ``Poisson(y | exp(eta))`` at the sampled z, a
Monte-Carlo term that works with every engine. Since eta = C z + d is Gaussian under the guide
(mean mu, variance sigma^2 per bin and neuron, from the posterior's path moments), the
expected log-likelihood has the closed form

    E_q[log Poisson(y | exp(eta))] = y mu - exp(mu + sigma^2 / 2) - log y!

(:func:`poisson_expected_log_likelihood`; :meth:`MultimodalGPVAE.expected_log_likelihood`).
With ``analytic_poisson=True`` the neural site keeps its Poisson density and declares this
closed form to ELBO engines (``infer={"expected_log_prob": ...}``, recomputing the guide's
moments from the encoders; :func:`pvae.protocol.expected_log_prob`): :class:`pvae.inference.ELBO`
and ``KalmanELBO`` then use it in place of ``log p(y | z)`` at the draw, so the ELBO keeps its
value in expectation and loses the Monte-Carlo noise of that term (a Rao-Blackwellised ELBO).
An importance-weighted bound and ``pvae.log_likelihood`` need ``log p(y | z)`` at each draw and
read the density, as without the option (Pyro's own ``Trace_ELBO`` does too).

Priors are swappable components with one small interface (:class:`TemporalPrior`): the
Fourier RBF prior here, or a time-domain Markovian (state-space) prior whose guide is the
Kalman-smoothed prior times the same potentials (:class:`MarkovianPrior`, built here on an
Ornstein-Uhlenbeck (Matérn-1/2) state per channel; a Matérn SDE of higher order plugs in by
replacing its ``state_space`` method).

``model(counts, frames, times, modality_mask)``: ``counts (B, T, num_neurons)`` whole numbers,
``frames (B, T, *image_shape)``, ``times (B, T)`` evenly spaced (the same step in every
trial; None: step 1), ``modality_mask (B, 2)`` bool, True = observed, columns in
:data:`MODALITIES` order (None: all observed). The values of a missing modality are ignored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import likelihoods, nets, validation
from pvae.distributions._checks import positive_int as _positive_int
from pvae.distributions.fourier import FourierRBFPrior, fourier_basis, rbf_spectral_density
from pvae.distributions.state_space import MarkovianPrior
from pvae.distributions.temporal import TemporalPrior
from pvae.gaussian import product_of_experts
from pvae.protocol import EXPECTED_LOG_PROB

from ._names import claim

__all__ = [
    "FourierRBFPrior",
    "MODALITIES",
    "MarkovianPrior",
    "MultimodalGPVAE",
    "TemporalPrior",
    "fourier_basis",
    "poisson_expected_log_likelihood",
    "rbf_spectral_density",
]

MODALITIES = ("neural", "image")
GROUPS = ("shared", "neural", "image")
_NO_PRECISION = 1e-10  # precision of an absent potential where a finite one is needed


def poisson_expected_log_likelihood(counts: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """``E[log Poisson(y | exp(eta))]`` for ``eta ~ N(mean, variance)``, elementwise:
    ``y mean - exp(mean + variance / 2) - log y!`` (shapes broadcast)."""
    return counts * mean - torch.exp(mean + 0.5 * variance) - torch.lgamma(counts + 1)


PRIORS = {"fourier": FourierRBFPrior, "markovian": MarkovianPrior}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _temporal_prior(
    prior: str | TemporalPrior, num_channels: int, lengthscale: float
) -> TemporalPrior:
    """The prior process: built from its name in :data:`PRIORS`, or ``prior`` itself when it
    is a :class:`TemporalPrior` module with ``num_channels`` channels.

    :raises ValueError, TypeError: an unknown name, a wrong channel count or another type.
    """
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(
                f"prior must be one of {tuple(PRIORS)} or a TemporalPrior, got {prior!r}"
            )
        return PRIORS[prior](num_channels, lengthscale)
    if isinstance(prior, TemporalPrior) and isinstance(prior, nn.Module):
        if prior.num_channels != num_channels:
            raise ValueError(
                f"prior has {prior.num_channels} channels, the model {num_channels} "
                "(shared_dim + neural_dim + image_dim)"
            )
        return prior
    raise TypeError(f"prior must be a name or a TemporalPrior module, got {type(prior).__name__}")


class MultimodalGPVAE(PyroModule):
    """MM-GPVAE: shared and modality-private GP latents, Poisson spikes and images.

    :param num_neurons: neurons of the neural modality.
    :param image_shape: ``(C, H, W)`` of a frame (flattened for the MLPs).
    :param shared_dim, neural_dim, image_dim: Ls, Ln, Li latent channels per group (the
        private ones may be 0).
    :param hidden: hidden widths of the encoders and of the image decoder.
    :param prior: ``"fourier"`` (:class:`FourierRBFPrior`), ``"markovian"``
        (:class:`MarkovianPrior`), or a :class:`TemporalPrior` instance over
        ``Ls + Ln + Li`` channels.
    :param lengthscale: the prior's initial lengthscale (time units).
    :param image_likelihood: the frames' likelihood by name (:mod:`pvae.likelihoods`). For
        noise-free frames on a constant background (``mm-gp-sim``) use ``"gaussian"`` (a
        normal likelihood, as in the paper's model) with a fixed scale of 1: measured on
        ``mm-gp-sim`` (tutorial 06's recipe, held-out R^2 of the image-private latent), the
        continuous Bernoulli gives about 0.45 and falls with training (its log-density at a
        grey level of exactly 0 or 1 grows without bound as the logit runs off, so training
        chases the background), a Gaussian of scale 1 gives 0.97, one of scale 0.1 lets the
        64 pixels outweigh the spikes and mixes the groups.
    :param image_likelihood_kw: keywords of that likelihood (``{"scale": 1.0}`` fixes a
        Gaussian's scale; learned scales train with the image decoder).
    :param analytic_poisson: declare the neural site's closed-form expectation under the guide
        to ELBO engines (other engines and ``pvae.log_likelihood`` use the Poisson density;
        see the module docstring).
    :param name: prefix of the model's names in Pyro's parameter store.

    Channel layout of the site ``"z"``'s paths: ``[shared | neural | image]``, slices in
    :attr:`groups`.
    """

    def __init__(
        self,
        num_neurons: int,
        image_shape: Sequence[int] = (1, 8, 8),
        shared_dim: int = 1,
        neural_dim: int = 1,
        image_dim: int = 1,
        hidden: Sequence[int] = (128,),
        prior: str | TemporalPrior = "fourier",
        lengthscale: float = 5.0,
        image_likelihood: str = "continuous_bernoulli",
        image_likelihood_kw: dict | None = None,
        analytic_poisson: bool = False,
        name: str = "mmgpvae",
    ) -> None:
        num_neurons = _positive_int(num_neurons, "num_neurons")
        shared_dim = _positive_int(shared_dim, "shared_dim")
        neural_dim = _positive_int(neural_dim, "neural_dim", 0)
        image_dim = _positive_int(image_dim, "image_dim", 0)
        shape = tuple(image_shape)
        if len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            raise ValueError(
                f"image_shape must be three positive integers (C, H, W), got {image_shape!r}"
            )
        if image_likelihood_kw is not None and not isinstance(image_likelihood_kw, dict):
            raise TypeError(
                "image_likelihood_kw must be a dict or None, got "
                f"{type(image_likelihood_kw).__name__}"
            )
        if not isinstance(analytic_poisson, bool):
            raise TypeError(f"analytic_poisson must be a bool, got {analytic_poisson!r}")
        super().__init__(claim(name, self))
        self.num_neurons, self.image_shape = num_neurons, shape
        self.x_dim = math.prod(shape)
        self.analytic_poisson = analytic_poisson
        self._muted: frozenset[str] = frozenset()  # modalities whose private channels are off
        self.dims = {"shared": shared_dim, "neural": neural_dim, "image": image_dim}
        starts = [0, shared_dim, shared_dim + neural_dim, shared_dim + neural_dim + image_dim]
        self.groups = {g: slice(starts[i], starts[i + 1]) for i, g in enumerate(GROUPS)}
        self.num_channels = starts[-1]
        self.prior_process: TemporalPrior = _temporal_prior(prior, self.num_channels, lengthscale)
        # channels each modality drives: neural = [shared, neural], image = [shared, image]
        index = torch.arange(self.num_channels)
        self.register_buffer(
            "neural_channels", index[: shared_dim + neural_dim].clone(), persistent=False
        )
        image_channels = torch.cat([index[:shared_dim], index[shared_dim + neural_dim :]])
        self.register_buffer("image_channels", image_channels, persistent=False)
        hidden = tuple(hidden)
        self.neural_encoder = nets.build_encoder(
            "mlp", num_neurons, shared_dim + neural_dim, hidden
        )
        self.image_encoder = nets.build_encoder("mlp", self.x_dim, shared_dim + image_dim, hidden)
        self.neural_decoder = nn.Linear(shared_dim + neural_dim, num_neurons)  # C, d
        self.image_likelihood = likelihoods.get(
            image_likelihood, self.x_dim, **(image_likelihood_kw or {})
        )
        self.image_decoder = nets.build_decoder(
            "mlp",
            shared_dim + image_dim,
            self.x_dim,
            tuple(reversed(hidden)),
            self.image_likelihood.param_size,
        )

    # -- checks -------------------------------------------------------------------------------
    def _check(
        self, counts: Tensor, frames: Tensor, times: Tensor | None, modality_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, float, Tensor]:
        """``(counts (B, T, N), frames (B, T, x_dim), dt, modality_mask (B, 2))``."""
        for label, value in (("counts", counts), ("frames", frames)):
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(
                    f"{label} must be a floating-point tensor, got {type(value).__name__}"
                )
        if counts.dim() != 3 or counts.shape[-1] != self.num_neurons:
            raise ValueError(
                f"counts must have shape (B, T, num_neurons={self.num_neurons}), got "
                f"{tuple(counts.shape)}"
            )
        B, T = counts.shape[:2]
        if tuple(frames.shape) != (B, T, *self.image_shape) and tuple(frames.shape) != (
            B,
            T,
            self.x_dim,
        ):
            raise ValueError(
                f"frames must have shape (B, T, *image_shape) = {(B, T, *self.image_shape)}, "
                f"got {tuple(frames.shape)}"
            )
        dt = 1.0
        if times is not None:
            if not isinstance(times, Tensor) or tuple(times.shape) != (B, T):
                raise ValueError(
                    f"times must be a (B, T) = {(B, T)} tensor, got "
                    f"{getattr(times, 'shape', times)}"
                )
            validation.check_times(times)
            if T > 1:
                steps = times[:, 1:] - times[:, :-1]
                dt = float(steps[0, 0])
                if not dt > 0 or not torch.allclose(
                    steps, steps.new_tensor(dt), rtol=1e-4, atol=1e-6
                ):
                    raise ValueError(
                        "times must be evenly spaced with the same positive step in every trial "
                        "(the Fourier prior needs a regular grid)"
                    )
        if modality_mask is None:
            modality_mask = torch.ones(B, 2, dtype=torch.bool, device=counts.device)
        elif not isinstance(modality_mask, Tensor) or modality_mask.dtype != torch.bool:
            raise TypeError("modality_mask must be a bool tensor (B, 2), True = observed")
        elif tuple(modality_mask.shape) != (B, 2):
            raise ValueError(
                f"modality_mask must have shape (B, 2) = {(B, 2)} (columns {MODALITIES}), got "
                f"{tuple(modality_mask.shape)}"
            )
        return counts, frames.reshape(B, T, self.x_dim), dt, modality_mask

    # -- pieces -------------------------------------------------------------------------------
    def potentials(
        self, counts: Tensor, frames: Tensor, modality_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The fused per-bin Gaussian potentials ``(loc, precision)``, each ``(B, T, C)``:
        each present modality's encoder on its channels, precisions added (product of
        experts); precision ~0 (1e-10) where no modality speaks."""
        B, T = counts.shape[:2]
        loc = counts.new_zeros(B, 2, T, self.num_channels)
        scale = torch.full_like(loc, math.inf)
        neural_loc, neural_scale = self.neural_encoder(torch.log1p(counts))
        image_loc, image_scale = self.image_encoder(frames)
        loc[:, 0, :, self.neural_channels] = neural_loc
        scale[:, 0, :, self.neural_channels] = neural_scale
        loc[:, 1, :, self.image_channels] = image_loc
        scale[:, 1, :, self.image_channels] = image_scale
        weights = modality_mask[:, :, None, None]
        # a vanishing expert N(0, 1 / _NO_PRECISION) keeps channels that no modality speaks for
        # finite (and their gradients free of 0/0): their precision is 1e-10, not 0
        floor = (0.0, _NO_PRECISION**-0.5)
        fused_loc, fused_scale = product_of_experts(loc, scale, weights=weights, prior=floor, dim=1)
        return fused_loc, fused_scale.pow(-2)

    def posterior(
        self,
        counts: Tensor,
        frames: Tensor,
        times: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> dist.TorchDistribution:
        """The guide's distribution of the site ``"z"``, batch shape ``(B,)``."""
        counts, frames, dt, modality_mask = self._check(counts, frames, times, modality_mask)
        loc, precision = self.potentials(counts, frames, modality_mask)
        return self.prior_process.posterior(loc, precision, dt)

    def shared_parameters(self) -> tuple[str, ...]:
        """Parameters meant to feed both the model and the guide (declared, so the pair's
        parameter split does not warn; :func:`pvae.protocol.declared_shared`): the temporal
        prior's (the guide is the prior times the encoders' potentials) and, with
        ``analytic_poisson``, the encoders' (the closed-form expected Poisson likelihood reads
        the guide's moments)."""
        shared = [f"{self._pyro_name}.prior"]
        if self.analytic_poisson:
            shared += [f"{self._pyro_name}.neural_encoder", f"{self._pyro_name}.image_encoder"]
        return tuple(shared)

    def _register(self, part: str) -> None:
        pyro.module(f"{self._pyro_name}.prior", self.prior_process)  # type: ignore[arg-type]
        if part == "decoder":
            pyro.module(f"{self._pyro_name}.neural_decoder", self.neural_decoder)
            pyro.module(f"{self._pyro_name}.image_decoder", self.image_decoder)
            # a likelihood with parameters (a learned Gaussian scale) trains with the decoder
            if any(True for _ in self.image_likelihood.parameters()):
                pyro.module(f"{self._pyro_name}.image_likelihood", self.image_likelihood)
        if part == "encoder" or (part == "decoder" and self.analytic_poisson):
            pyro.module(f"{self._pyro_name}.neural_encoder", self.neural_encoder)
            pyro.module(f"{self._pyro_name}.image_encoder", self.image_encoder)

    def _decoder_input(self, z: Tensor, modality: str) -> Tensor:
        """The channels ``modality``'s decoder reads, ``[shared, private]`` (the private ones
        as zeros inside :meth:`private_off`)."""
        channels = z[..., self.neural_channels if modality == "neural" else self.image_channels]
        if modality not in self._muted:
            return channels
        shared = self.dims["shared"]
        return torch.cat([channels[..., :shared], torch.zeros_like(channels[..., shared:])], -1)

    @contextlib.contextmanager
    def private_off(self, *modalities: str) -> Iterator[None]:
        """Inside the block the decoders of ``modalities`` read only the shared channels:
        their private channels enter as zeros (the guide still infers them, and their KL
        pulls them to the prior). A staged start for identification: trained first with
        ``private_off("image")``, the shared channels must carry what the images share with
        the spikes before the image-private channels can take it (``mm-gp-sim``: without
        it, the image-private channel often takes the rotation that the shared one should
        carry, and the size is lost; ``benchmarks/papers/mmgpvae.py``)."""
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be some of {MODALITIES}, got {modalities!r}")
        before = self._muted
        self._muted = before | frozenset(modalities)
        try:
            yield
        finally:
            self._muted = before

    def _eta_moments(
        self, q: dist.TorchDistribution, num_steps: int, dt: float
    ) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``eta = C z + d`` under ``q``, each ``(B, T, num_neurons)``."""
        mean, variance = self.prior_process.path_moments(q, num_steps, dt)
        mean = self._decoder_input(mean, "neural")
        variance = self._decoder_input(variance, "neural")
        return self.neural_decoder(mean), variance @ self.neural_decoder.weight.pow(2).mT

    # -- the pair -----------------------------------------------------------------------------
    def model(
        self,
        counts: Tensor,
        frames: Tensor,
        times: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> None:
        """p(y, x, z) for a batch of trials; a missing modality is not scored."""
        counts, frames, dt, modality_mask = self._check(counts, frames, times, modality_mask)
        B, T = counts.shape[:2]
        self._register("decoder")
        with pyro.plate("data", B):
            value = pyro.sample("z", self.prior_process.prior(B, T, dt))
            z = self.prior_process.paths(value, T, dt)  # (..., B, T, C)
            neural_present, image_present = modality_mask[:, 0], modality_mask[:, 1]
            rate = self.neural_decoder(self._decoder_input(z, "neural")).exp()
            spikes = dist.Poisson(rate).to_event(2).mask(neural_present)
            infer: dict = {}  # a key of its own: not in Pyro's InferDict
            if self.analytic_poisson:  # read by ELBO engines only; the density stays exact

                def expected() -> Tensor:
                    loc, precision = self.potentials(counts, frames, modality_mask)
                    q = self.prior_process.posterior(loc, precision, dt)
                    mean, variance = self._eta_moments(q, T, dt)
                    value = poisson_expected_log_likelihood(counts, mean, variance).sum((-2, -1))
                    return torch.where(neural_present, value, torch.zeros_like(value))

                infer[EXPECTED_LOG_PROB] = expected
            pyro.sample("neural", spikes, obs=counts, infer=infer)  # type: ignore[arg-type]
            params = self.image_decoder(self._decoder_input(z, "image"))
            images = self.image_likelihood(params).to_event(1).to_event(1)
            pyro.sample("image", images.mask(image_present), obs=frames)

    def guide(
        self,
        counts: Tensor,
        frames: Tensor,
        times: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> None:
        """q(z | y, x): the prior times the fused encoder potentials, normalised exactly."""
        counts, frames, dt, modality_mask = self._check(counts, frames, times, modality_mask)
        self._register("encoder")
        loc, precision = self.potentials(counts, frames, modality_mask)
        with pyro.plate("data", counts.shape[0]):
            pyro.sample("z", self.prior_process.posterior(loc, precision, dt))

    # -- conveniences (no engine needs them) --------------------------------------------------
    @torch.no_grad()
    def expected_log_likelihood(
        self,
        counts: Tensor,
        frames: Tensor,
        times: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> Tensor:
        """``E_q[log p(y | z)]`` of the spike counts under the guide, in closed form, ``(B,)``
        (0 for trials without the neural modality)."""
        counts, frames, dt, modality_mask = self._check(counts, frames, times, modality_mask)
        loc, precision = self.potentials(counts, frames, modality_mask)
        q = self.prior_process.posterior(loc, precision, dt)
        mean, variance = self._eta_moments(q, counts.shape[1], dt)
        expected = poisson_expected_log_likelihood(counts, mean, variance).sum((-2, -1))
        return torch.where(modality_mask[:, 0], expected, torch.zeros_like(expected))

    @torch.no_grad()
    def hyperparameters(self) -> dict[str, list[float]]:
        """The prior's learned ``lengthscale`` per channel, ``[shared | neural | image]``."""
        lengthscale = getattr(self.prior_process, "log_lengthscale", None)
        if not isinstance(lengthscale, Tensor):
            return {}
        return {"lengthscale": lengthscale.exp().tolist()}

    @torch.no_grad()
    def latents(
        self,
        counts: Tensor,
        frames: Tensor,
        times: Tensor | None = None,
        modality_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The posterior mean paths per group, ``{"shared": (B, T, Ls), "neural": ...,
        "image": ...}`` (ready for :func:`pvae.diagnostics.identification_r2`)."""
        counts, frames, dt, modality_mask = self._check(counts, frames, times, modality_mask)
        loc, precision = self.potentials(counts, frames, modality_mask)
        q = self.prior_process.posterior(loc, precision, dt)
        mean, _ = self.prior_process.path_moments(q, counts.shape[1], dt)
        return {g: mean[..., s] for g, s in self.groups.items() if s.stop > s.start}

    @torch.no_grad()
    def sample(
        self, num_steps: int, num_samples: int = 1, dt: float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draws from the prior: ``(paths (S, T, C), rates (S, T, num_neurons), image means
        (S, T, *image_shape))``."""
        _positive_int(num_steps, "num_steps")
        _positive_int(num_samples, "num_samples")
        value = self.prior_process.prior(num_samples, num_steps, dt).sample()
        z = self.prior_process.paths(value, num_steps, dt)
        rates = self.neural_decoder(self._decoder_input(z, "neural")).exp()
        images = self.image_likelihood.mean(self.image_decoder(self._decoder_input(z, "image")))
        return z, rates, images.reshape(num_samples, num_steps, *self.image_shape)


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import Integer, ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402


@torch.no_grad()
def identification_metrics(
    model: MultimodalGPVAE, ds: Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """How well a trained MM-GPVAE identifies the true latent groups of a
    :class:`pvae.data.MultimodalSequenceSplits` split (:func:`pvae.diagnostics.
    identification_r2`, held-out trials): ``r2_<group>`` the R^2 of the true group from the
    inferred one of the same name (``shared``, ``neural``, ``image``, those the model has), and
    ``r2_cross_max`` the largest R^2 between different groups (low when the groups are
    disentangled). Empty when the split has no truth or fewer than 4 trials. Deterministic
    (``seed`` unused)."""
    from pvae.diagnostics import identification_r2

    parts = tuple(getattr(ds, split))
    trials = int(parts[0].shape[0])
    truth = getattr(ds, "truth", {}).get(split, {})
    groups = [g for g in ("shared", "neural", "image") if g in truth and model.dims[g] > 0]
    if not groups or trials < 4:
        return {}
    was_training = model.training
    model.eval()
    try:
        inferred = model.latents(*parts)
    finally:
        model.train(was_training)
    result = identification_r2(
        {g: inferred[g] for g in groups}, {g: truth[g][:trials] for g in groups}
    )  # a subset keeps the first trials: cut the truth alike
    out = {f"r2_{g}": float(result.diagonal[g]) for g in groups}
    out["r2_cross_max"] = float(result.off_diagonal_max())
    return out


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    private_dim: int,
    lengthscale: float,
    analytic_poisson: str,
) -> MultimodalGPVAE:
    require_mlp("mmgpvae", net)
    if ds.image_shape is None:
        raise ValueError(f"model 'mmgpvae' needs image frames; {ds.name!r} has no image_shape")
    return MultimodalGPVAE(
        int(getattr(ds, "num_neurons", 0)),
        image_shape=tuple(ds.image_shape),
        shared_dim=z_dim,
        neural_dim=private_dim,
        image_dim=private_dim,
        hidden=tuple(hidden),
        prior="fourier",
        lengthscale=lengthscale,
        image_likelihood=likelihood,
        analytic_poisson=analytic_poisson == "yes",
    )


CARD = ModelCard(
    name="mmgpvae",
    description="MM-GPVAE: shared (--z-dim channels) and modality-private GP latents over time "
    "behind Poisson spike counts and images, Fourier-domain RBF prior (Gondur et al. 2024)",
    factory=_build,
    accepts=("multimodal-sequences",),
    options=(
        Option.of(
            MultimodalGPVAE,
            "neural_dim",
            Integer(0),
            name="private_dim",
            help="latent channels private to each modality",
        ),
        Option.of(MultimodalGPVAE, "lengthscale", Real(0.0, open_below=True)),
        Option.of(
            MultimodalGPVAE,
            "analytic_poisson",
            help="closed-form expected Poisson log-likelihood in the ELBO (IWAE and log p(x) "
            "keep the Poisson density)",
        ),
    ),
    capabilities=("sample", "per-channel"),
    decoder=lambda model: None,  # its latent is a set of paths: no traversal of one z
    metrics=identification_metrics,
    channels={"z": -2},  # Fourier coefficients (channels, frequencies): channels first
)
