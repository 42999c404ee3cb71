"""The structured VAE with a linear dynamical prior (Johnson et al. 2016; Zhao & Linderman 2023).

Generative story, for each sequence n (one datapoint of ``pyro.plate("data")``) with frames
``y_1..y_T`` on a regular grid:

    z_1 ~ N(m_1, P_1),   z_t = A z_{t-1} + q_t,  q_t ~ N(0, Q)        (StateSpacePrior)
    y_t | z_t ~ p_theta(y_t | z_t)          for observed t only        (decoder per frame)

A (spectral norm at most 0.999: stable), Q, m_1 and P_1 are learned; the decoder is an MLP or
a small conv net with a likelihood chosen by name, or the linear-Gaussian emission
``N(y_t | C z_t + d, diag(s^2))`` (``net="linear"``).

Inference network (guide): an encoder maps each observed frame to a Gaussian potential
``N(y~_t | z_t, diag(v_t))`` on the state, and the guide is the prior times the potentials,
normalised and smoothed exactly by the Kalman smoother::

    q(z | y) = p(z) prod_{t observed} N(y~_t | z_t, diag(v_t)) / Z     (KalmanSmoothedPosterior)

Missing frames get no potential (the smoother simply predicts through them) and are not
scored by the likelihood. Self-supervised training (``drop_fraction > 0``, Zhao & Linderman
2023): while the module is in training mode, random windows of ``window`` frames are also
withheld from the encoder, while the likelihood still scores every observed frame, so the
dynamics must carry the state across the gap. Call ``.eval()`` before evaluating a bound.

With ``net="linear"`` and ``exact_potentials=True`` the potentials are the emission itself
(``y~_t = y_t - d``, observation matrix C, covariance diag(s^2)): the guide is the exact
posterior and every bound equals the Kalman log-likelihood ``log p(y)``.

The pair trains with ELBO, IWAE and :class:`pvae.inference.KalmanELBO` (exact KL; exact
expected log-likelihood for the linear-Gaussian emission). ``model(values, times, mask)``
receives a :class:`pvae.data.SequenceSplit`: ``values (B, T, *event_shape)``, ``times (B, T)``
(the grid is taken as regular: A is shared by every step), ``mask (B, T)`` bool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import likelihoods, nets
from pvae.distributions import KalmanSmoothedPosterior, LinearGaussianEmission, StateSpacePrior

from ._names import claim

__all__ = ["StructuredVAE"]

NETS = ("mlp", "conv", "linear")
MAX_SPECTRAL_NORM = 0.999


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


def _tril(raw: Tensor) -> Tensor:
    """A Cholesky factor from an unconstrained square matrix: softplus on the diagonal."""
    diagonal = F.softplus(raw.diagonal()) + 1e-4
    return raw.tril(-1) + torch.diag_embed(diagonal)


class LinearDynamics(nn.Module):
    """The learned parameters of the prior: A, Q = L L^T, m_1 and P_1 = L_1 L_1^T.

    ``A = W * min(1, 0.999 / ||W||_2)``: the spectral norm of A is at most 0.999, so every
    eigenvalue lies inside the unit circle (the prior is stable) while rotations stay
    reachable. Initialised at A = 0.95 I, Q = 0.1 I, m_1 = 0, P_1 = I.
    """

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.95 * torch.eye(z_dim))
        self.transition_raw = nn.Parameter(torch.eye(z_dim) * _inverse_softplus(0.1**0.5))
        self.initial_loc = nn.Parameter(torch.zeros(z_dim))
        self.initial_raw = nn.Parameter(torch.eye(z_dim) * _inverse_softplus(1.0))

    def transition_matrix(self) -> Tensor:
        norm = torch.linalg.matrix_norm(self.weight, ord=2)
        return self.weight * (MAX_SPECTRAL_NORM / norm.clamp(min=MAX_SPECTRAL_NORM))

    def transition_cov(self) -> Tensor:
        tril = _tril(self.transition_raw)
        return tril @ tril.mT

    def initial_cov(self) -> Tensor:
        tril = _tril(self.initial_raw)
        return tril @ tril.mT


class StructuredVAE(PyroModule):
    """Structured VAE: LDS prior, per-frame decoder, encoder potentials smoothed exactly.

    :param x_dim: size of one frame (flattened; ``prod(event_shape)``).
    :param z_dim: state dimension D.
    :param hidden: hidden widths of the encoder and decoder networks.
    :param likelihood: likelihood of a frame by name (:mod:`pvae.likelihoods`), e.g.
        ``"continuous_bernoulli"`` for grey frames or ``"gaussian"``; ``net="linear"``
        needs ``"gaussian"``.
    :param net: ``"mlp"``, ``"conv"`` (needs ``image_shape``) or ``"linear"`` (a
        linear-Gaussian decoder, MLP encoder).
    :param image_shape: ``(C, H, W)`` of a frame for the conv nets.
    :param exact_potentials: (``net="linear"`` only) the guide's potentials are the emission
        itself, so the guide is the exact posterior.
    :param drop_fraction: share of each sequence's frames withheld from the encoder in random
        windows during training (self-supervised masking); 0 disables it.
    :param window: length of the withheld windows.
    :param method: the smoother's ``"sequential"`` or ``"parallel"`` method.
    :param likelihood_kw: extra keywords of the likelihood (e.g. ``{"scale": 0.3}``).
    :param name: prefix of the model's names in Pyro's parameter store (unique per instance).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 4,
        hidden: Sequence[int] = (128,),
        likelihood: str = "continuous_bernoulli",
        net: str = "mlp",
        image_shape: tuple[int, int, int] | None = None,
        exact_potentials: bool = False,
        drop_fraction: float = 0.0,
        window: int = 5,
        method: str = "sequential",
        likelihood_kw: dict | None = None,
        name: str = "svae",
    ):
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        if net == "linear" and likelihood != "gaussian":
            raise ValueError(f"net 'linear' needs likelihood 'gaussian', got {likelihood!r}")
        if exact_potentials and net != "linear":
            raise ValueError("exact_potentials needs the linear-Gaussian decoder (net='linear')")
        if not 0.0 <= float(drop_fraction) < 1.0:
            raise ValueError(f"drop_fraction must lie in [0, 1), got {drop_fraction!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        super().__init__(claim(name, self))
        self.x_dim, self.z_dim = int(x_dim), int(z_dim)
        self.net, self.method = net, method
        self.exact_potentials = bool(exact_potentials)
        self.drop_fraction, self.window = float(drop_fraction), window
        self.likelihood = likelihoods.get(likelihood, self.x_dim, **(likelihood_kw or {}))
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())
        self.dynamics = LinearDynamics(self.z_dim)
        self.encoder, self.decoder = nets.build_frame_networks(
            net, self.x_dim, self.z_dim, hidden, self.likelihood.param_size, image_shape
        )

    # -- pieces -------------------------------------------------------------------------------
    def prior(self, num_steps: int) -> StateSpacePrior:
        """``p(z_1..z_T)`` with the learned A, Q, m_1, P_1 (event shape ``(T, z_dim)``)."""
        d = self.dynamics
        return StateSpacePrior(
            d.transition_matrix(),
            d.transition_cov(),
            d.initial_loc,
            d.initial_cov(),
            num_steps,
            method=self.method,
        )

    def _emission_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(C, d, R)`` of the linear-Gaussian decoder, R = diag(scale^2)."""
        assert isinstance(self.decoder, nn.Linear)
        scale = self.likelihood.scale.expand(self.x_dim)  # type: ignore[operator]
        return self.decoder.weight, self.decoder.bias, torch.diag_embed(scale.pow(2))

    def _check(self, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Frames flattened to ``(B, T, x_dim)`` and the ``(B, T)`` bool mask (all True when
        None)."""
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError("values must be a floating-point tensor (B, T, *event_shape)")
        if values.dim() < 3 or math.prod(values.shape[2:]) != self.x_dim:
            raise ValueError(
                f"values must have shape (B, T, *event_shape) with prod(event_shape) = "
                f"{self.x_dim}, got {tuple(values.shape)}"
            )
        x = values.reshape(*values.shape[:2], self.x_dim)
        if mask is None:
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = observed), got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"mask must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
            )
        return x, mask

    def _drop_windows(self, mask: Tensor) -> Tensor:
        """``mask`` with random windows of ``window`` steps hidden, about ``drop_fraction`` of
        each sequence (torch's global generator)."""
        B, T = mask.shape
        window = min(self.window, T)
        count = math.ceil(self.drop_fraction * T / window)
        starts = torch.randint(0, T - window + 1, (B, count), device=mask.device)
        steps = torch.arange(T, device=mask.device)
        hidden = (steps >= starts[..., None]) & (steps < starts[..., None] + window)
        return mask & ~hidden.any(1)

    def posterior(self, x: Tensor, mask: Tensor) -> KalmanSmoothedPosterior:
        """``q(z | y)`` for frames ``x (B, T, x_dim)`` with potentials at the True steps of
        ``mask``; batch shape ``(B,)``."""
        prior = self.prior(x.shape[-2])
        if self.exact_potentials:
            C, d, R = self._emission_parameters()
            return KalmanSmoothedPosterior(prior, x - d, C, R, mask=mask)
        loc, scale = self.encoder(x)
        return KalmanSmoothedPosterior.from_diagonal_potentials(prior, loc, scale, mask=mask)

    def _register(self, part: str) -> None:
        pyro.module(f"{self._pyro_name}.dynamics", self.dynamics)
        if part == "decoder" or self.exact_potentials:
            pyro.module(f"{self._pyro_name}.decoder", self.decoder)
            if self._likelihood_learns:
                pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        if part == "encoder" and not self.exact_potentials:
            pyro.module(f"{self._pyro_name}.encoder", self.encoder)

    # -- the pair -----------------------------------------------------------------------------
    def model(self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None):
        """p(y, z) for a batch of sequences; frames are scored where ``mask`` is True."""
        x, mask = self._check(values, mask)
        self._register("decoder")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x.shape[1]))
            if self.net == "linear":
                C, d, R = self._emission_parameters()
                emission = LinearGaussianEmission(z, C, d, R, mask=mask, latent_site="z")
                pyro.sample("x", emission, obs=x)
            else:
                frames = self.likelihood(self.decoder(z)).to_event(1)  # batch (..., B, T)
                pyro.sample("x", frames.mask(mask).to_event(1), obs=x)

    def guide(self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None):
        """q(z | y): the prior times the encoder's potentials at the observed frames."""
        x, mask = self._check(values, mask)
        self._register("encoder")
        if self.training and self.drop_fraction > 0:
            mask = self._drop_windows(mask)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x, mask))

    # -- conveniences (no engine needs them) --------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Mean of p(y_t | z_t) per step, ``(..., x_dim)`` for ``z (..., z_dim)``."""
        if self.net == "linear":
            return self.decoder(z)
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def impute(self, values: Tensor, mask: Tensor) -> Tensor:
        """Fill the hidden frames: the observed frames as given, the others the decoded
        smoothed posterior mean; shape of ``values``."""
        x, mask = self._check(values, mask)
        mean = self.decode(self.posterior(x, mask).mean)
        return torch.where(mask[..., None], x, mean).reshape(values.shape)

    @torch.no_grad()
    def forecast(self, values: Tensor, steps: int, mask: Tensor | None = None) -> Tensor:
        """Decoded means of the next ``steps`` frames after each sequence,
        ``(B, steps, *event_shape)``: the last smoothed state mean ``m`` rolled forward by the
        prior (``A^k m``)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        x, mask = self._check(values, mask)
        state = self.posterior(x, mask).mean[..., -1, :]
        A = self.dynamics.transition_matrix()
        states = []
        for _ in range(steps):
            state = state @ A.mT
            states.append(state)
        return self.decode(torch.stack(states, -2)).reshape(x.shape[0], steps, *values.shape[2:])

    @torch.no_grad()
    def sample(self, num_steps: int, num_samples: int = 1) -> Tensor:
        """Decoded means of trajectories drawn from the prior, ``(num_samples, T, x_dim)``."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        z = self.prior(num_steps).sample(torch.Size([num_samples]))
        return self.decode(z)
