"""The Koopman VAE (KoVAE; Naiman et al. 2024): a sequential VAE whose prior is linearised.

Generative story, for each sequence n (one datapoint of ``pyro.plate("data")``) with rows
``x_1..x_T`` (``C`` channels):

    h_t = GRU(z_{t-1}, h_{t-1}),  z_0 = 0, h_0 = 0
    z_t | z_<t ~ N(mu(h_t), diag sigma(h_t)^2)                  (sequential GRU prior)
    x_t | z_t  ~ p_theta(x_t | z_t)        for observed rows t    (decoder per step)

Inference network (guide): a bidirectional GRU over the (interpolated) sequence gives
``q(z_t | x_1..x_T) = N(m_t, diag s_t^2)``, all steps at once (one site ``"z"``, event
``(T, z_dim)``).

**The sequential ELBO.** The model's site ``"z"`` is the whole prior path: its density at the
guide's draw is ``sum_t log N(z_t | mu(h_t), sigma(h_t))`` with ``h_t`` run on the *guide's*
past samples ``z_<t`` (teacher forcing, :class:`SequentialPrior`), which is what a Pyro model
replayed on the guide computes. So every engine's bound is the proper sequential bound

    ELBO = E_q[ sum_t log p(x_t | z_t) + log p(z_1..z_T) - log q(z_1..z_T | x) ].

The authors' code instead scores the KL between the posterior and the prior's *own* rollouts
(the prior's means and scales computed on prior samples rather than on the posterior's past):
that is not a bound on ``log p(x)``. Here only the Koopman predictive term below uses rollouts.

**The Koopman operator.** On every training step the model rolls out ``B`` latent paths
``z-bar`` from the sequential prior (reparameterised) and fits a Koopman matrix by
differentiable least squares over all steps of all rollouts,

    A = argmin_A || Z_future - Z_past A ||_F^2,  Z_past = [z-bar_1..z-bar_{T-1}], rows,

(:func:`koopman_operator`, QR or the pseudo-inverse; row vectors, ``z_{t+1} ~ z_t A``). The
predictive loss rolls A forward over ``horizon`` steps,

    L_pred = 1/H sum_{h=1..H} mean_{n,t} || z-bar_{t+h} - z-bar_t A^h ||^2

(``horizon=1`` is the paper's one-step loss), optionally the same loss of the guide's latent
paths under the rollouts' A (``beta L_post = beta L_pred(z, A)`` with ``z`` the model's draw of
site ``"z"``, i.e. the guide's path while training; ``beta = posterior_weight``), and spectral
penalties on the eigenvalues of A
express domain knowledge (:func:`spectral_penalty`): a bound on the modulus (``"stable"``:
``sum relu(|lambda| - r)^2``), modulus one (``"unit"``: ``sum (|lambda| - 1)^2``, conservative
systems) or prescribed eigenvalues (each attracts its nearest eigenvalue of A). As in the paper,
the training loss is ``-ELBO + alpha L_pred + gamma L_eig`` (``alpha = predictive_weight``,
``gamma = spectral_weight``, per sequence).

**What makes the eigenvalues identifiable.** A is fitted on the prior's *free* rollouts, while
the ELBO trains the prior only on the guide's paths (teacher forcing). Nothing but the penalty
ties the two, and the eigenvalues of A are only those of the data when the encoder's basis
makes the latent dynamics linear. Measured on ``oscillators`` (true eigenvalues
0.913 +- 0.359i, 20 epochs of 500 sequences, z_dim 2): with the default weights the rollouts of
3 seeds in 5 rotate by about 0.25 rad per step instead of 0.375 (the free-running GRU drifts
from its teacher-forced behaviour, and the guide's paths are themselves warped); with
``predictive_weight = posterior_weight = 100`` (the per-sequence ELBO of that data is in the
hundreds, so weights near 1 do not move it) 4 seeds in 5 land within 0.05. A spectral
penalty switched on from the first step is worse: at initialisation A's eigenvalues are small
and real, the penalty drives each along the real axis to its nearest admissible point, and for
``"unit"`` a 2 x 2 A reaches the reflection ``{-1, +1}`` (both of modulus one) which it
cannot leave without passing through ``det A = 0``, where the penalty is largest; that was
the ``-0.96, +0.99`` of the "unit" constraint on oscillators. ``spectral_warmup`` (training
steps before the spectral penalty starts) lets the dynamics form a complex pair first; the
penalty then only moves its modulus.

**How the penalty enters the objective, and what the bound reports.** The penalty is a
``pyro.factor("koopman_penalty", ...)`` in the model, inside the data plate (so it counts once
per sequence, scaled N/B like the other per-sequence terms), whose *value is zero* and whose
gradient is that of ``-(alpha L_pred + gamma L_eig)``: the factor is ``-P + P.detach()``.
Every engine (ELBO, IWAE and its variants, Pyro's own ELBOs) therefore trains the penalty
(for importance weights the factor is the same for every particle, so its self-normalised
gradient is the penalty's gradient), while the value every engine reports, and
``pvae.log_likelihood``, is the bound itself, untouched. The penalty's values of the last step
are in :attr:`KoopmanVAE.penalties`. The factor is only added while the module is in training
mode (``.train()``, the default); ``.eval()`` skips the rollouts.

**Irregular data.** Rows with ``mask`` False are missing: the input path is interpolated
through the observed rows with a natural cubic spline in time (:func:`natural_cubic_spline`,
held constant before the first and after the last observed row) before encoding, and the
likelihood scores observed rows only.

**Bounded data, per-sequence identity.** A Gaussian sequential prior carries each sequence's
own parameters (on ``sines``, a frequency and a phase per channel) as noise added over the
steps, so decoded samples have Gaussian tails where bounded data have none. Two options
address it: ``output_range`` squashes the decoder's mean onto the data's range
(:class:`BoundedMean`) and ``step_scale`` fixes the prior's scale after the first step, so a
sequence's identity is drawn once in ``z_1`` (:class:`StepScalePriorNet`); the Koopman fit,
its losses and the sequential ELBO are the same with either. The prior, trained on the guide's
paths, runs narrower when free; ``sample(noise_scale=)`` widens its draws (on ``sines`` a
factor of 1.2-1.3 matches the data's end spread).

``model(values, times, mask)`` receives a :class:`pvae.data.SequenceSplit`: ``values (B, T, C)``,
``times (B, T)`` (the spline's knots), ``mask (B, T)`` bool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import likelihoods, nets, validation
from pvae.distributions.sequential import PriorNet, SequentialPrior
from pvae.gp import natural_cubic_spline

from ._names import claim
from ._sequence import legacy_frame_order

__all__ = [
    "BoundedMean",
    "KoopmanVAE",
    "PathDecoder",
    "SequentialPrior",
    "generation_metrics",
    "koopman_operator",
    "natural_cubic_spline",
    "operator_penalty",
    "predictive_loss",
    "spectral_penalty",
    "StepScalePriorNet",
]

SOLVERS = ("qr", "pinv")
CONSTRAINTS = ("stable", "unit")
DECODERS = ("mlp", "gru")


# --------------------------------------------------------------------------------------------
# Koopman pieces


def koopman_operator(z: Tensor, solver: str = "qr") -> Tensor:
    """The least-squares Koopman matrix of latent paths, differentiable.

    :param z: ``(N, T, k)`` paths (rows are steps), ``N (T - 1) >= k``.
    :param solver: ``"qr"`` (``A = R^-1 Q^T Y`` with ``X = QR``) or ``"pinv"``
        (``A = X^+ Y``).
    :returns: ``A (k, k)`` minimising ``|| Y - X A ||_F`` with ``X`` the stacked
        ``z_1..z_{T-1}`` and ``Y`` the stacked ``z_2..z_T`` (``z_{t+1} ~ z_t A``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(z, Tensor) or z.dim() != 3:
        raise ValueError(f"z must be a tensor (N, T, k), got {getattr(z, 'shape', type(z))}")
    k = z.shape[-1]
    past = z[:, :-1].reshape(-1, k)
    future = z[:, 1:].reshape(-1, k)
    if past.shape[0] < k:
        raise ValueError(f"z has {past.shape[0]} transitions; the fit needs at least k = {k}")
    if solver == "pinv":
        return torch.linalg.pinv(past) @ future
    q, r = torch.linalg.qr(past)
    return torch.linalg.solve_triangular(r, q.mT @ future, upper=True)


def predictive_loss(z: Tensor, A: Tensor, horizon: int = 1) -> Tensor:
    """``1/H sum_{h=1..H} mean_{n,t} || z_{t+h} - z_t A^h ||^2`` for paths ``z (N, T, k)``."""
    horizon = min(int(horizon), z.shape[1] - 1)
    total = z.new_zeros(())
    power = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    for h in range(1, horizon + 1):
        power = power @ A
        error = z[:, h:] - z[:, :-h] @ power
        total = total + error.pow(2).sum(-1).mean()
    return total / max(horizon, 1)


def operator_penalty(A: Tensor, constraint: str | Tensor, max_modulus: float = 1.0) -> Tensor:
    """The spectral penalty of a real matrix ``A (k, k)`` as trained.

    For the modulus constraints it is :func:`spectral_penalty` of ``eigvals(A)``. For
    prescribed eigenvalues ``mu_j`` it is ``sum_j sigma_min(A - mu_j I)^2``: the squared
    distance (spectral norm) from A to the nearest matrix with eigenvalue ``mu_j``, zero exactly
    when ``mu_j`` is an eigenvalue of A. Unlike the distance between eigenvalues it is smooth
    where eigenvalues collide, so a real pair can turn into the prescribed complex pair.
    """
    if isinstance(constraint, Tensor):
        eye = torch.eye(
            A.shape[-1],
            dtype=torch.complex64 if A.dtype != torch.float64 else torch.complex128,
            device=A.device,
        )
        shifted = A.to(eye.dtype) - constraint.to(eye.dtype)[:, None, None] * eye  # (m, k, k)
        return torch.linalg.svdvals(shifted)[..., -1].pow(2).sum()
    return spectral_penalty(torch.linalg.eigvals(A), constraint, max_modulus)


def spectral_penalty(
    eigenvalues: Tensor, constraint: str | Tensor, max_modulus: float = 1.0
) -> Tensor:
    """A penalty on eigenvalues ``(k,)`` (complex) that is zero when ``constraint`` holds.

    - ``"stable"``: ``sum_i relu(|lambda_i| - max_modulus)^2``;
    - ``"unit"``: ``sum_i (|lambda_i| - 1)^2`` (conservative dynamics);
    - a tensor of prescribed eigenvalues ``mu_j``: ``sum_j min_i |lambda_i - mu_j|^2``.
    """
    modulus = eigenvalues.abs()
    if isinstance(constraint, Tensor):
        target = constraint.to(eigenvalues.dtype)
        distance = (eigenvalues[:, None] - target[None, :]).abs().pow(2)  # (k, m)
        return distance.min(0).values.sum()
    return _modulus_penalty(modulus, constraint, max_modulus)


def _modulus_penalty(modulus: Tensor, constraint: str, max_modulus: float) -> Tensor:
    if constraint == "stable":
        return F.relu(modulus - max_modulus).pow(2).sum()
    if constraint == "unit":
        return (modulus - 1.0).pow(2).sum()
    raise ValueError(f"constraint must be one of {CONSTRAINTS} or a tensor, got {constraint!r}")


# --------------------------------------------------------------------------------------------
# The model


class PathDecoder(nn.Module):
    """A decoder of whole latent paths: a bidirectional GRU over ``z_1..z_T``, then a linear
    map of each step's two hidden states to the likelihood's parameters.

    Shapes: ``(..., T, z_dim) -> (..., T, out_dim)``.
    """

    def __init__(self, z_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(z_dim, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, out_dim)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-2]
        states, _ = self.rnn(z.reshape(-1, *z.shape[-2:]))
        params = self.out(states)
        return params.reshape(*lead, *params.shape[-2:])


class StepScalePriorNet(PriorNet):
    """:class:`PriorNet` whose steps after the first have a fixed scale ``step_scale``.

    ``z_1 ~ N(mu(h_1), sigma(h_1))`` as before (a learned Gaussian: each sequence's identity is
    drawn once), then ``z_t | z_<t ~ N(mu(h_t), step_scale^2 I)`` for ``t >= 2``. A small
    ``step_scale`` makes the prior's paths nearly deterministic given ``z_1``, so per-sequence
    properties (a frequency, a phase) cannot be carried by per-step noise.
    """

    def __init__(self, z_dim: int, hidden: int, step_scale: float) -> None:
        super().__init__(z_dim, hidden)
        self.step_scale = float(step_scale)

    def _step_scales(self, scale: Tensor, first: int) -> Tensor:
        """Steps ``first, first + 1, ...`` of ``scale (..., steps, k)``, every step after the
        first replaced by ``step_scale``."""
        steps = first + torch.arange(scale.shape[-2], device=scale.device)[:, None]
        return torch.where(steps > 0, scale.new_tensor(self.step_scale), scale)


class BoundedMean(nn.Module):
    """A decoder whose output (a Gaussian likelihood's mean) is squashed onto ``(low, high)``:
    ``low + (high - low) sigmoid(net(z))``. Shapes as ``net``'s."""

    def __init__(self, net: nn.Module, low: float, high: float) -> None:
        super().__init__()
        self.net, self.low, self.high = net, float(low), float(high)

    def forward(self, z: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self.net(z))


def _output_range(output_range: Any, likelihood: str) -> tuple[float, float] | None:
    """``output_range`` checked: None or finite ``(low, high)`` with ``low < high``, only with
    the Gaussian likelihood (whose parameter is the mean).

    :raises ValueError: anything else.
    """
    if output_range is None:
        return None
    try:
        low, high = (float(v) for v in output_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"output_range must be None or a pair (low, high), got {output_range!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"output_range must be finite with low < high, got {output_range!r}")
    if likelihood != "gaussian":
        raise ValueError(
            f"output_range bounds a Gaussian mean: it needs likelihood='gaussian', got "
            f"{likelihood!r}"
        )
    return low, high


def _constraint(
    constraint: str | Tensor | Sequence[complex] | None, z_dim: int
) -> str | Tensor | None:
    """``constraint`` checked: None, a name of :data:`CONSTRAINTS`, or 1 to ``z_dim``
    prescribed eigenvalues as a complex64 vector.

    :raises ValueError: anything else.
    """
    if constraint is None or isinstance(constraint, str):
        if constraint is not None and constraint not in CONSTRAINTS:
            raise ValueError(
                f"constraint must be None, one of {CONSTRAINTS} or prescribed eigenvalues, "
                f"got {constraint!r}"
            )
        return constraint
    values = torch.as_tensor(constraint).to(torch.complex64).reshape(-1)
    if values.numel() == 0 or values.numel() > z_dim:
        raise ValueError(
            f"constraint: give between 1 and z_dim = {z_dim} prescribed eigenvalues, "
            f"got {values.numel()}"
        )
    return values


def _check_options(
    sizes: dict[str, Any],
    weights: dict[str, Any],
    spectral_warmup: Any,
    max_modulus: Any,
    solver: Any,
    decoder: Any,
    step_scale: Any,
) -> None:
    """The scalar options of :class:`KoopmanVAE` checked: ``sizes`` positive integers,
    ``weights`` finite numbers >= 0, the others as the class docstring says.

    :raises ValueError: naming the first option that is wrong.
    """
    for label, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if isinstance(spectral_warmup, bool) or not isinstance(spectral_warmup, int):
        raise ValueError(f"spectral_warmup must be an integer >= 0, got {spectral_warmup!r}")
    if spectral_warmup < 0:
        raise ValueError(f"spectral_warmup must be an integer >= 0, got {spectral_warmup!r}")
    for label, value in weights.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    if not (isinstance(max_modulus, int | float) and max_modulus > 0):
        raise ValueError(f"max_modulus must be positive, got {max_modulus!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if step_scale is not None and not (
        isinstance(step_scale, int | float)
        and not isinstance(step_scale, bool)
        and math.isfinite(step_scale)
        and step_scale > 0
    ):
        raise ValueError(f"step_scale must be None or a positive number, got {step_scale!r}")


class KoopmanVAE(PyroModule):
    """Koopman VAE: sequential GRU prior linearised by a per-batch Koopman operator.

    :param x_dim: channels per step C.
    :param z_dim: latent size k per step.
    :param hidden: width of the GRUs (encoder, prior) and of the decoder's hidden layer.
    :param likelihood: likelihood of a row by name (:mod:`pvae.likelihoods`), e.g.
        ``"gaussian"``.
    :param predictive_weight: alpha, the weight of the Koopman predictive loss (per sequence).
    :param horizon: steps A is rolled forward in the predictive loss (1: the paper's).
    :param constraint: None, ``"stable"``, ``"unit"`` or a complex tensor of prescribed
        eigenvalues (:func:`spectral_penalty`).
    :param spectral_weight: gamma, the weight of the spectral penalty (per sequence).
    :param max_modulus: the bound of the ``"stable"`` constraint.
    :param solver: ``"qr"`` or ``"pinv"`` for the least-squares fit.
    :param likelihood_kw: extra keywords of the likelihood (e.g. ``{"scale": 0.1}``).
    :param sequential_prior: False replaces the sequential prior by ``z_t ~ N(0, I)`` i.i.d.
        per step (no Koopman penalty): the non-sequential baseline of the ablations.
    :param posterior_weight: beta, the weight of the predictive loss of the guide's latent
        paths under the rollouts' operator A (per sequence; 0: the paper's loss).
    :param spectral_warmup: training steps (model calls in training mode) before the spectral
        penalty is added (module docstring: a penalty from step 0 can trap A).
    :param decoder: ``"mlp"`` (the default: row ``t`` decoded from ``z_t`` alone by an MLP) or
        ``"gru"`` (a bidirectional GRU of width ``hidden`` over the whole latent path, then a
        linear map per step, as in the authors' code: row ``t`` reads ``z_1..z_T``, so the
        rows of a noisy prior path come out smooth; :class:`PathDecoder`).
    :param step_scale: None (the default: every step's prior scale ``sigma(h_t)`` learned) or
        a fixed scale of the prior's steps after the first (:class:`StepScalePriorNet`: each
        sequence's identity drawn once, in ``z_1``). Measured on ``sines`` it does not help:
        the samples lose diversity and still jitter (``benchmarks/papers/kovae.py``).
    :param output_range: None (the default) or ``(low, high)``: the Gaussian mean is
        ``low + (high - low) sigmoid(.)`` (:class:`BoundedMean`), so decoded means, samples and
        imputations stay inside the range, e.g. the range of the training data when the data
        are bounded. On ``sines`` (every entry in [0.5, 1]; 40 epochs, seed 0, one classifier
        run) it moved the strict discriminative score from 0.28 to 0.17 and the TimeGAN
        protocol's from 0.22 to 0.08, with every sample inside the range (96% left
        [0.495, 1] before). The default stays None: the range is the data's, not the model's.
    :param name: prefix of the model's names in Pyro's parameter store.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 8,
        hidden: int = 32,
        likelihood: str = "gaussian",
        predictive_weight: float = 1.0,
        horizon: int = 1,
        constraint: str | Tensor | Sequence[complex] | None = None,
        spectral_weight: float = 1.0,
        max_modulus: float = 1.0,
        solver: str = "qr",
        likelihood_kw: dict | None = None,
        sequential_prior: bool = True,
        posterior_weight: float = 0.0,
        spectral_warmup: int = 0,
        decoder: str = "mlp",
        step_scale: float | None = None,
        output_range: tuple[float, float] | None = None,
        name: str = "kvae",
    ):
        _check_options(
            dict(x_dim=x_dim, z_dim=z_dim, hidden=hidden, horizon=horizon),
            dict(
                predictive_weight=predictive_weight,
                spectral_weight=spectral_weight,
                posterior_weight=posterior_weight,
            ),
            spectral_warmup,
            max_modulus,
            solver,
            decoder,
            step_scale,
        )
        bounds = _output_range(output_range, likelihood)
        constraint = _constraint(constraint, z_dim)
        super().__init__(claim(name, self))
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, hidden
        self.predictive_weight, self.spectral_weight = (
            float(predictive_weight),
            float(spectral_weight),
        )
        self.horizon, self.solver, self.max_modulus = horizon, solver, float(max_modulus)
        self.constraint = constraint
        self.sequential_prior = bool(sequential_prior)
        self.posterior_weight = float(posterior_weight)
        self.spectral_warmup = spectral_warmup
        self.penalty_steps = 0  # training-mode model calls that added the penalty
        self.likelihood = likelihoods.get(likelihood, x_dim, **(likelihood_kw or {}))
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())
        self.encoder_rnn = nn.GRU(x_dim, hidden, batch_first=True, bidirectional=True)
        self.encoder_head = nn.Linear(2 * hidden, 2 * z_dim)
        self.step_scale = None if step_scale is None else float(step_scale)
        self.output_range = bounds
        self.prior_net = (
            PriorNet(z_dim, hidden)
            if step_scale is None
            else StepScalePriorNet(z_dim, hidden, float(step_scale))
        )
        out_dim = x_dim * self.likelihood.param_size
        self.decoder_kind = decoder
        self.decoder: nn.Module = (
            nets.MLPDecoder(z_dim, out_dim, (hidden,))
            if decoder == "mlp"
            else PathDecoder(z_dim, out_dim, hidden)
        )
        if bounds is not None:
            self.decoder = BoundedMean(self.decoder, *bounds)
        self.penalties: dict[str, float] = {}

    # -- pieces -------------------------------------------------------------------------------
    def _check(
        self, values: Tensor, times: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError("values must be a floating-point tensor (B, T, x_dim)")
        if values.dim() != 3 or values.shape[-1] != self.x_dim or values.shape[1] < 2:
            raise ValueError(
                f"values must have shape (B, T >= 2, x_dim = {self.x_dim}), got "
                f"{tuple(values.shape)}"
            )
        B, T = values.shape[:2]
        if times is None:
            times = torch.arange(T, dtype=values.dtype, device=values.device).expand(B, T)
        elif not isinstance(times, Tensor) or times.shape != (B, T):
            raise ValueError(
                f"times must be a tensor (B, T) = {(B, T)}, got {getattr(times, 'shape', times)}"
            )
        else:
            validation.check_times(times)
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=values.device)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B, T):
            raise ValueError(
                f"mask must be a bool tensor (B, T) = {(B, T)}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
            )
        return values, times, mask

    def prior(self, num_steps: int, batch_size: int | None = None) -> Any:
        """``p(z_1..z_T)``, batch shape ``(batch_size,)`` (or none), event ``(T, z_dim)``."""
        shape = torch.Size([] if batch_size is None else [batch_size])
        if not self.sequential_prior:
            zero = self.encoder_head.weight.new_zeros(())
            return dist.Normal(zero, 1.0).expand(shape + (num_steps, self.z_dim)).to_event(2)
        return SequentialPrior(self.prior_net, num_steps, shape)

    def posterior(self, values: Tensor, times: Tensor, mask: Tensor) -> Any:
        """``q(z | x)``: the bidirectional GRU over the spline-interpolated path, batch ``(B,)``,
        event ``(T, z_dim)``."""
        path = values if bool(mask.all()) else natural_cubic_spline(times, values, mask)
        out, _ = self.encoder_rnn(path)
        loc, raw = self.encoder_head(out).chunk(2, -1)
        return dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(2)

    def koopman(self, num_paths: int = 256, num_steps: int = 24) -> Tensor:
        """The Koopman matrix ``A (z_dim, z_dim)`` fitted on ``num_paths`` fresh prior
        rollouts of ``num_steps`` steps (torch's global generator; differentiable)."""
        return koopman_operator(self.prior_net.rollout(num_paths, num_steps), self.solver)

    def penalty(self, num_paths: int, num_steps: int, latent: Tensor | None = None) -> Tensor:
        """``alpha L_pred + gamma L_eig`` on ``num_paths`` prior rollouts, plus
        ``beta L_pred(latent, A)`` on the latent paths ``latent (..., T, k)`` when given (a
        scalar)."""
        paths = self.prior_net.rollout(num_paths, num_steps)
        A = koopman_operator(paths, self.solver)
        total = paths.new_zeros(())
        if self.predictive_weight > 0:
            pred = predictive_loss(paths, A, self.horizon)
            self.penalties["predictive"] = float(pred.detach())
            total = total + self.predictive_weight * pred
        if latent is not None and self.posterior_weight > 0:
            flat = latent.reshape(-1, *latent.shape[-2:])
            post = predictive_loss(flat, A, self.horizon)
            self.penalties["posterior"] = float(post.detach())
            total = total + self.posterior_weight * post
        warm = self.penalty_steps >= self.spectral_warmup
        if self.constraint is not None and self.spectral_weight > 0 and warm:
            eig = operator_penalty(A, self.constraint, self.max_modulus)
            self.penalties["spectral"] = float(eig.detach())
            total = total + self.spectral_weight * eig
        return total

    def _register(self, part: str) -> None:
        if part == "model":
            pyro.module(f"{self._pyro_name}.prior", self.prior_net)
            pyro.module(f"{self._pyro_name}.decoder", self.decoder)
            if self._likelihood_learns:
                pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        else:
            pyro.module(f"{self._pyro_name}.encoder_rnn", self.encoder_rnn)
            pyro.module(f"{self._pyro_name}.encoder_head", self.encoder_head)

    # -- the pair -----------------------------------------------------------------------------
    def model(self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None):
        """p(x, z) for a batch of sequences; rows are scored where ``mask`` is True; while
        training, the zero-valued Koopman penalty factor (module docstring)."""
        values, times, mask = self._check(values, times, mask)
        self._register("model")
        B, T = values.shape[:2]
        penalize = (
            self.training
            and self.sequential_prior
            and (
                self.predictive_weight > 0
                or self.posterior_weight > 0
                or (self.constraint is not None and self.spectral_weight > 0)
            )
        )
        with pyro.plate("data", B):
            z = pyro.sample("z", self.prior(T, B))
            rows = self.likelihood(self.decoder(z)).to_event(1)  # batch (..., B, T)
            pyro.sample("x", rows.mask(mask).to_event(1), obs=values)
            if penalize:
                penalty = self.penalty(B, T, z)
                self.penalty_steps += 1
                surrogate = penalty.detach() - penalty  # value 0, gradient -grad(penalty)
                pyro.factor("koopman_penalty", surrogate.expand(B))

    def guide(self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None):
        """q(z | x): bidirectional GRU over the interpolated sequence."""
        values, times, mask = self._check(values, times, mask)
        self._register("guide")
        with pyro.plate("data", values.shape[0]):
            pyro.sample("z", self.posterior(values, times, mask))

    # -- conveniences (no engine needs them) --------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Mean of ``p(x_t | z)``: ``(..., x_dim)`` for ``z (..., z_dim)`` with the ``"mlp"``
        decoder (per step); ``(..., T, x_dim)`` for a path ``z (..., T, z_dim)`` with either."""
        if self.decoder_kind == "gru" and z.dim() < 2:
            raise ValueError(
                "z must be a latent path (..., T, z_dim) for the 'gru' decoder, got "
                f"{tuple(z.shape)}"
            )
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def impute(
        self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Fill the hidden rows: observed rows as given, the others the decoded posterior
        mean; ``(B, T, x_dim)``. ``times (B, T)`` (None: ``0..T-1``), ``mask (B, T)`` bool,
        True = observed (:class:`pvae.protocol.SequenceVAE`)."""
        times, mask = legacy_frame_order(times, mask, "impute")
        values, times, mask = self._check(values, times, mask)
        mean = self.decode(self.posterior(values, times, mask).mean)
        return torch.where(mask[..., None], values, mean)

    @torch.no_grad()
    def forecast(
        self,
        values: Tensor,
        steps: int,
        times: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Decoded means of the next ``steps`` rows after each sequence, ``(B, steps, x_dim)``:
        the sequential prior's mean rollout continued from the posterior mean path
        (:meth:`pvae.distributions.PriorNet.continue_means`); with the standard-normal prior
        (``sequential_prior=False``) the decoded prior mean."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        times, mask = legacy_frame_order(times, mask, "forecast")
        values, times, mask = self._check(values, times, mask)
        path = self.posterior(values, times, mask).mean
        if not self.sequential_prior:
            future = path.new_zeros(path.shape[0], steps, self.z_dim)
        else:
            future = self.prior_net.continue_means(path, steps)
        if self.decoder_kind == "gru":  # the path decoder reads the past path too
            return self.decode(torch.cat([path, future], 1))[:, path.shape[1] :]
        return self.decode(future)

    @torch.no_grad()
    def sample(
        self,
        num_steps: int,
        num_samples: int = 1,
        times: Tensor | None = None,
        *,
        noise_scale: float = 1.0,
    ) -> Tensor:
        """Decoded means of paths drawn from the sequential prior, ``(num_samples, T, x_dim)``.
        ``times (num_steps,)`` is accepted for :class:`pvae.protocol.SequenceVAE`: the prior is
        over steps, so the stamps do not change the draws. ``noise_scale`` multiplies each
        step's prior noise (1, the default: the prior itself; 0: its mean dynamics). The prior
        is trained on the guide's paths (teacher forcing), so its free-running paths can come
        out narrower than the data: on ``sines`` their last rows' sd is 0.10-0.12 against the
        data's 0.134, and a factor of 1.2-1.3, chosen to match the training data's last-row sd
        (``benchmarks/papers/kovae.py``), closes it."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        num_samples = validation.positive_int(num_samples, "num_samples")
        noise_scale = validation.finite_float(noise_scale, "noise_scale", minimum=0.0)
        if times is not None:
            if not isinstance(times, Tensor) or times.shape != (num_steps,):
                raise ValueError(f"times must be a tensor of shape ({num_steps},)")
            validation.check_times(times)
        if not self.sequential_prior:
            paths = self.prior(num_steps).sample(torch.Size([num_samples]))
            return self.decode(noise_scale * paths)
        return self.decode(self.prior_net.rollout(num_samples, num_steps, noise_scale))

    @torch.no_grad()
    def eigenvalues(self, num_paths: int = 512, num_steps: int = 24) -> Tensor:
        """Eigenvalues ``(z_dim,)`` (complex) of the Koopman matrix fitted on fresh prior
        rollouts, sorted by decreasing modulus."""
        values = torch.linalg.eigvals(self.koopman(num_paths, num_steps))
        return values[values.abs().argsort(descending=True)]

    def plot_eigenvalues(self, ax: Any = None, true: Tensor | None = None, **rollout: int) -> Any:
        """The eigenvalues of A in the complex plane against the unit circle (and ``true``
        ones, when given); returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
        angle = torch.linspace(0, 2 * math.pi, 200)
        ax.plot(angle.cos(), angle.sin(), color="grey", lw=1, label="unit circle")
        eig = self.eigenvalues(**rollout)
        ax.scatter(eig.real, eig.imag, marker="x", color="C0", label="learned")
        if true is not None:
            true = torch.as_tensor(true)
            ax.scatter(
                true.real, true.imag, marker="o", facecolors="none", color="C3", label="true"
            )
        ax.set_aspect("equal")
        ax.set_xlabel("Re λ")
        ax.set_ylabel("Im λ")
        ax.legend(loc="lower left", fontsize="small")
        return ax.figure


def generation_metrics(
    model: KoopmanVAE, ds: Any, split: str = "test", num_runs: int = 5, seed: int = 0
) -> dict[str, float]:
    """Generation scores of ``model`` on a sequence data set: discriminative score (mean and
    sd over ``num_runs``) and predictive score, against the complete sequences of ``split``
    (``ds.truth[split]["complete"]`` when recorded, else the values as given).

    This is the family's extra metric for ``pvae compare`` on sequences.
    """
    from pvae.metrics import discriminative_score, predictive_score

    part = getattr(ds, split)
    truth = (getattr(ds, "truth", None) or {}).get(split, {})
    real = truth.get("complete", part.values).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generated = model.sample(real.shape[1], real.shape[0])
    disc = discriminative_score(real, generated, num_runs=num_runs, seed=seed)
    pred = predictive_score(real, generated, seed=seed)
    return {
        "discriminative": disc["mean"],
        "discriminative_sd": disc["sd"],
        "predictive": pred,
    }


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import Choice, Integer, ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    predictive_weight: float,
    horizon: int,
    constraint: str,
) -> KoopmanVAE:
    require_mlp("kvae", net)
    return KoopmanVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=int(hidden[0]) if hidden else 32,
        likelihood=likelihood,
        predictive_weight=predictive_weight,
        horizon=horizon,
        constraint=None if constraint == "none" else constraint,
    )


def _metrics(model: KoopmanVAE, ds: Splits, split: str = "test", seed: int = 0) -> dict[str, float]:
    """The Koopman VAE's generation scores (discriminative: mean and sd over 5 post-hoc
    classifiers; predictive) on ``split``."""
    return generation_metrics(model, ds, split, seed=seed)


CARD = ModelCard(
    name="kvae",
    description="Koopman VAE: sequential GRU prior linearised by a least-squares Koopman "
    "operator (Naiman et al. 2024); generation metrics: pvae.models.koopman.generation_metrics",
    factory=_build,
    accepts=("sequences",),
    options=(
        Option.of(KoopmanVAE, "predictive_weight", Real(0.0)),
        Option.of(KoopmanVAE, "horizon", Integer(1)),
        Option.of(
            KoopmanVAE,
            "constraint",
            Choice(("none", *CONSTRAINTS)),
            help="penalty on the Koopman eigenvalues",
        ),
    ),
    capabilities=("impute", "forecast", "sample", "per-channel"),
    decoder=lambda model: None,
    metrics=_metrics,
    channels={"z": -1},
)
