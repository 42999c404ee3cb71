"""The structured VAE with a linear dynamical prior (Johnson et al. 2016; Zhao & Linderman 2023).

Generative story, for each sequence n (one datapoint of ``pyro.plate("data")``) with frames
``y_1..y_T`` at time stamps ``t_1 < ... < t_T`` (any spacing)::

    dz = F z dt + dW,  Cov(dW) = Sigma dt      (continuous-time linear dynamics, time in
                                                units of ``time_scale``)
    z_1 ~ N(m_1, P_1),   z_t = A_t z_{t-1} + q_t,  q_t ~ N(0, Q_t)      (StateSpacePrior)
    A_t = expm(F dt_t),  Q_t = int_0^{dt_t} expm(F s) Sigma expm(F s)^T ds,  dt_t = t_t - t_{t-1}
    y_t | z_t ~ p_theta(y_t | z_t)          for observed t only        (decoder per frame)

The generator F (contracting: its symmetric part is at most -1e-3), the diffusion Sigma, m_1
and P_1 are learned; ``(A_t, Q_t)`` is the exact discretisation on each sequence's own gaps
(:func:`pvae.gp.lti_discretisation`), so an irregular grid is modelled as such. On a regular
grid every step shares one ``(A, Q)``, computed once, and any stable discrete-time pair with a
real logarithm and a positive-definite Sigma is reachable
(:meth:`LinearDynamicsPrior.set_transition` sets one). The decoder is an MLP or a small conv
net with a likelihood chosen by name, or the linear-Gaussian emission
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
strictly increasing per sequence (None: frames ``time_scale`` apart), ``mask (B, T)`` bool;
hidden frames may hold NaN (replaced by zeros before any arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import gp, likelihoods, nets, validation
from pvae.distributions import KalmanSmoothedPosterior, LinearGaussianEmission, StateSpacePrior

from ._names import claim
from ._sequence import legacy_frame_order, legacy_sample_order

__all__ = ["LinearDynamicsPrior", "StateSpaceVAE", "StructuredVAE"]

NETS = ("mlp", "conv", "linear")
DYNAMICS_INITS = ("decay", "rotation")
ROTATION_RADIUS = 0.99  # |eigenvalue| of the rotation blocks of dynamics_init="rotation"
CONTRACTION = 1e-3  # the generator's symmetric part is <= -1e-3: ||A_k||_2 <= exp(-1e-3 dt_k)
REGULAR_RTOL = 1e-5  # gaps equal to this relative tolerance count as one regular grid


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


def _tril(raw: Tensor) -> Tensor:
    """A Cholesky factor from an unconstrained square matrix: softplus on the diagonal."""
    diagonal = F.softplus(raw.diagonal()) + 1e-4
    return raw.tril(-1) + torch.diag_embed(diagonal)


def spread_angles(count: int) -> list[float]:
    """``count`` rotation angles evenly spread over ``(0, pi / 2)``: ``k pi / (2 (count + 1))``
    for ``k = 1..count`` (radians per step; for 2 blocks, pi / 6 and pi / 3). Chosen without
    looking at any data: from slow turns to a little under a quarter turn per step."""
    return [k * math.pi / (2 * (count + 1)) for k in range(1, count + 1)]


class LinearDynamicsPrior(nn.Module):
    """The learned continuous-time prior: generator F, diffusion Sigma = L L^T, m_1, P_1.

    The state follows the linear SDE ``dz = F z dt + dW``, ``Cov(dW) = Sigma dt``, with time
    measured in units of ``time_scale``; between stamps ``dt_k`` apart it moves by the exact
    discretisation (:func:`pvae.gp.lti_discretisation`)::

        A_k = expm(F dt_k / time_scale),
        Q_k = int_0^{dt_k / time_scale} expm(F s) Sigma expm(F s)^T ds

    ``F = W - relu(lambda_max((W + W^T) / 2) + 1e-3) I``: the symmetric part of F is at most
    ``-1e-3``, so ``||A_k||_2 <= exp(-1e-3 dt_k / time_scale)`` (a contraction, the
    continuous-time form of the old bound ``||A||_2 <= 0.999`` per step) while rotations stay
    free. Initialised at ``F = log(0.95) I`` and Sigma such that one ``time_scale`` step
    gives ``A = 0.95 I``, ``Q = 0.1 I`` (the former discrete-time initialisation;
    ``init="decay"``), m_1 = 0, P_1 = I. With ``init="rotation"`` the one-``time_scale``
    transition starts as rotations instead (:meth:`set_rotations` with the angles of
    :func:`spread_angles`): a pure decay has real eigenvalues, and gradient training must
    first merge two of them into a complex pair before the state can oscillate, which on
    oscillating data (the pendulum) can take most of a short training run.

    :meth:`set_transition` sets F and Sigma from a discrete-time pair (A, Q) over one gap.
    """

    def __init__(self, z_dim: int, time_scale: float = 1.0, init: str = "decay") -> None:
        super().__init__()
        if init not in DYNAMICS_INITS:
            raise ValueError(f"init must be one of {DYNAMICS_INITS}, got {init!r}")
        self.time_scale = float(time_scale)
        rate = math.log(0.95)
        sigma = 0.1 * 2 * rate / math.expm1(2 * rate)  # Q(1) = sigma (e^{2 rate} - 1) / 2 rate
        self.generator_raw = nn.Parameter(rate * torch.eye(z_dim))
        self.diffusion_raw = nn.Parameter(torch.eye(z_dim) * _inverse_softplus(sigma**0.5))
        self.initial_loc = nn.Parameter(torch.zeros(z_dim))
        self.initial_raw = nn.Parameter(torch.eye(z_dim) * _inverse_softplus(1.0))
        if init == "rotation" and z_dim >= 2:
            self.set_rotations(spread_angles(z_dim // 2))

    def generator(self) -> Tensor:
        """F ``(D, D)``, per ``time_scale``."""
        W = self.generator_raw
        top = torch.linalg.eigvalsh(0.5 * (W + W.mT))[-1]
        return W - F.relu(top + CONTRACTION) * torch.eye(
            W.shape[-1], dtype=W.dtype, device=W.device
        )

    def diffusion_cov(self) -> Tensor:
        """Sigma ``(D, D)``, per ``time_scale``."""
        tril = _tril(self.diffusion_raw)
        return tril @ tril.mT

    def transitions(self, gaps: Tensor) -> tuple[Tensor, Tensor]:
        """``A_k, Q_k`` ``(..., K, D, D)`` for gaps ``(..., K)`` (in the units of times)."""
        return gp.lti_discretisation(
            self.generator(), self.diffusion_cov(), gaps.to(self.generator_raw) / self.time_scale
        )

    def transition_matrix(self, gap: float | None = None) -> Tensor:
        """``A = expm(F gap / time_scale)`` ``(D, D)`` over one gap (default ``time_scale``)."""
        return self._one(gap)[0]

    def transition_cov(self, gap: float | None = None) -> Tensor:
        """Q ``(D, D)`` over one gap (default ``time_scale``)."""
        return self._one(gap)[1]

    def _one(self, gap: float | None) -> tuple[Tensor, Tensor]:
        step = self.time_scale if gap is None else float(gap)
        A, Q = self.transitions(self.generator_raw.new_full((1,), step))
        return A[0], Q[0]

    def initial_cov(self) -> Tensor:
        tril = _tril(self.initial_raw)
        return tril @ tril.mT

    @torch.no_grad()
    def set_transition(self, A: Tensor, Q: Tensor, gap: float | None = None) -> None:
        """Set F and Sigma so that one ``gap`` (default ``time_scale``) gives exactly the
        discrete-time transition ``A`` and covariance ``Q`` ``(D, D)``.

        ``F = log(A) / step`` (principal logarithm from the eigendecomposition; A must be
        diagonalisable with no eigenvalue on the closed negative real axis) and Sigma solves
        the linear equation ``Q = int_0^step expm(F s) Sigma expm(F s)^T ds``. Refused when F
        is not contracting (see the class) or Sigma is not positive definite: no
        continuous-time model of this family has that (A, Q).
        """
        step = (self.time_scale if gap is None else float(gap)) / self.time_scale
        D = self.generator_raw.shape[-1]
        A64, Q64 = A.detach().double().cpu(), Q.detach().double().cpu()
        if A64.shape != (D, D) or Q64.shape != (D, D):
            raise ValueError(f"A and Q must have shape ({D}, {D})")
        values, vectors = torch.linalg.eig(A64)
        if bool(((values.imag.abs() < 1e-12) & (values.real <= 0)).any()):
            raise ValueError(
                "A has an eigenvalue on the negative real axis: it has no real logarithm"
            )
        generator = (vectors @ torch.diag(values.log()) @ torch.linalg.inv(vectors)).real / step
        symmetric_top = float(torch.linalg.eigvalsh(0.5 * (generator + generator.mT))[-1])
        if symmetric_top > -CONTRACTION:
            raise ValueError(
                f"log(A) has a symmetric part with eigenvalue {symmetric_top:g} > "
                f"-{CONTRACTION:g}: not a contraction this model can represent"
            )
        rows, cols = torch.triu_indices(D, D)
        basis = torch.zeros(len(rows), D, D, dtype=torch.float64)
        basis[torch.arange(len(rows)), rows, cols] = 1.0
        basis = basis + basis.mT - torch.diag_embed(basis.diagonal(dim1=-2, dim2=-1))
        one = torch.tensor([step], dtype=torch.float64)
        _, columns = gp.lti_discretisation(generator, basis, one)  # Q of each basis matrix
        design = columns[:, 0].reshape(len(rows), D * D).mT
        weights = torch.linalg.lstsq(design, Q64.reshape(D * D, 1)).solution[:, 0]
        sigma = (weights[:, None, None] * basis).sum(0)
        sigma = 0.5 * (sigma + sigma.mT)
        tril, info = torch.linalg.cholesky_ex(sigma)
        if int(info) != 0 or bool((tril.diagonal() <= 1e-4).any()):
            raise ValueError("the diffusion covariance that gives this Q is not positive definite")
        raw = tril.tril(-1) + torch.diag(torch.log(torch.expm1(tril.diagonal() - 1e-4)))
        self.generator_raw.copy_(generator.to(self.generator_raw))
        self.diffusion_raw.copy_(raw.to(self.diffusion_raw))

    @torch.no_grad()
    def set_rotations(self, angles: Sequence[float], radius: float = ROTATION_RADIUS) -> None:
        """Set the one-``time_scale`` transition to rotations: ``A`` block-diagonal with
        ``radius * [[cos a_k, -sin a_k], [sin a_k, cos a_k]]`` on coordinates ``(2k, 2k+1)``
        for the ``angles`` ``a_k`` (radians per ``time_scale``, each in ``(0, pi)``), and
        ``0.95`` on the coordinates left over; ``Q = diag(1 - |lambda|^2)``, so that a state
        with covariance I keeps it (the stationary covariance is I). Uses
        :meth:`set_transition`.

        :param angles: at most ``D // 2`` rotation angles.
        :param radius: modulus of the rotation eigenvalues, in ``(0, exp(-1e-3))`` (the
            contraction bound of the class).
        """
        D = self.generator_raw.shape[-1]
        angles = [validation.finite_float(a, "angles") for a in angles]
        if not 1 <= len(angles) <= D // 2:
            raise ValueError(f"angles must hold 1 to D // 2 = {D // 2} values, got {len(angles)}")
        if not all(0.0 < a < math.pi for a in angles):
            raise ValueError(f"angles must lie in (0, pi) radians, got {angles}")
        radius = validation.finite_float(radius, "radius")
        if not 0.0 < radius < math.exp(-CONTRACTION):
            raise ValueError(
                f"radius must lie in (0, exp(-{CONTRACTION:g})), got {radius!r} (a contraction)"
            )
        A = 0.95 * torch.eye(D, dtype=torch.float64)
        moduli = torch.full((D,), 0.95, dtype=torch.float64)
        for k, angle in enumerate(angles):
            c, s = radius * math.cos(angle), radius * math.sin(angle)
            A[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = torch.tensor([[c, -s], [s, c]])
            moduli[2 * k : 2 * k + 2] = radius
        self.set_transition(A, torch.diag(1.0 - moduli.pow(2)))

    # -- the prior interface of StateSpaceVAE -----------------------------------------------
    @property
    def channels(self) -> int:
        """L = D: the decoder reads the whole state."""
        return self.generator_raw.shape[-1]

    @property
    def state_dim(self) -> int:
        """D."""
        return self.generator_raw.shape[-1]

    def observation_matrix(self) -> None:
        """None: the encoder's potentials sit on the whole state."""
        return None

    def grid(self, times: Tensor | None, x: Tensor) -> Tensor | None:
        """The gaps of ``times`` ``(B, T)`` or ``(T,)`` for frames ``x (B, T, ...)``: None
        when ``times`` is None (every gap ``time_scale``) or T = 1, ``(1,)`` on a regular grid
        (equal gaps to 1e-5 relative: the transition is then computed once), ``(T-1,)`` when
        every sequence shares the stamps, ``(B, T-1)`` otherwise."""
        if times is None:
            return None
        B, T = x.shape[:2]
        if not isinstance(times, Tensor) or times.shape not in ((B, T), (T,)):
            raise ValueError(
                f"times must be a tensor of shape (B, T) = {(B, T)}, got "
                f"{tuple(getattr(times, 'shape', ()))}"
            )
        gaps = validation.check_times(times).to(x.dtype)
        if T == 1:
            return None
        if gaps.dim() == 2 and bool((gaps == gaps[:1]).all()):
            gaps = gaps[0]
        first = gaps.flatten()[0]
        if bool(((gaps - first).abs() <= REGULAR_RTOL * first).all()):
            return gaps.mean().reshape(1)
        return gaps

    def trajectory(self, gaps: Tensor | None, num_steps: int, method: str) -> StateSpacePrior:
        """``p(z_1..z_T)`` (event ``(T, D)``) on the grid of ``gaps`` (see :meth:`grid`)."""
        if gaps is None:
            gaps = self.generator_raw.new_full((1,), self.time_scale)
        A, Q = self.transitions(gaps)
        return StateSpacePrior(A, Q, self.initial_loc, self.initial_cov(), num_steps, method=method)


LinearDynamics = LinearDynamicsPrior
"""The former name of :class:`LinearDynamicsPrior` (kept for imports)."""


class StateSpaceVAE(PyroModule):
    """A VAE whose latent path is a linear-Gaussian state-space model, with a pluggable prior.

    Generative story for a sequence with frames ``y_1..y_T`` at stamps ``t_1 < ... < t_T``::

        s_1..s_T ~ p(s)                  a StateSpacePrior of the prior object, state size D
        y_t | s_t ~ p_theta(y_t | s_t[:L])  for observed t only (the decoder reads the first L
                                            coordinates of the state, L = prior.channels)

    and the guide is the prior times the encoder's Gaussian potentials
    ``N(y~_t | H s_t, diag(v_t))`` on those L coordinates (``H = [I_L, 0]``, or the identity
    when L = D), smoothed exactly (:class:`pvae.distributions.KalmanSmoothedPosterior`). The
    prior object is an ``nn.Module`` registered under ``prior_name`` (its parameters are named
    ``<name>.<prior_name>.*``) that offers:

    - ``channels`` (L) and ``state_dim`` (D);
    - ``grid(times, x)``: the validated grid of ``times`` (None: the prior's default spacing)
      for frames ``x (B, T, x_dim)``, in the form ``trajectory`` takes;
    - ``trajectory(grid, num_steps, method)``: the :class:`~pvae.distributions.StateSpacePrior`
      over ``(T, D)`` on that grid;
    - ``observation_matrix()``: ``H (L, D)``, or None when the potentials sit on the whole
      state (L = D);
    - ``transition_matrix(gap)``: ``A (D, D)`` over one gap (None: the prior's unit).

    :class:`StructuredVAE` plugs in :class:`LinearDynamicsPrior` (learned linear dynamics) and
    :class:`pvae.models.markovian_gp.MarkovianGPVAE` a Matérn SDE prior
    (:class:`pvae.models.markovian_gp.MaternSDEPrior`); their constructors document the rest.
    The pair implements :class:`pvae.protocol.SequenceVAE` (``impute``, ``forecast``,
    ``sample``). The prior's parameters feed the guide (the smoother runs on the prior) and
    the model; the class declares them in :meth:`shared_parameters`, so the pair's parameter
    split does not warn about them.

    :param x_dim: size of one frame (flattened).
    :param prior: the prior object (see above).
    :param prior_name: the attribute (and Pyro name part) the prior is registered under.
    :param hidden: and ``likelihood``, ``net``, ``image_shape``, ``exact_potentials``,
        ``drop_fraction``, ``window``, ``method``, ``likelihood_kw``, ``name``: as
        :class:`StructuredVAE`'s.
    """

    def __init__(
        self,
        x_dim: int,
        prior: nn.Module,
        prior_name: str,
        hidden: Sequence[int] = (128,),
        likelihood: str = "continuous_bernoulli",
        net: str = "mlp",
        image_shape: tuple[int, int, int] | None = None,
        exact_potentials: bool = False,
        drop_fraction: float = 0.0,
        window: int = 5,
        method: str = "sequential",
        likelihood_kw: dict | None = None,
        name: str = "ssvae",
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
        if not isinstance(prior, nn.Module) or not isinstance(prior_name, str):
            raise TypeError("prior must be an nn.Module and prior_name a str")
        super().__init__(claim(name, self))
        self.x_dim, self.z_dim = int(x_dim), int(prior.channels)  # type: ignore[arg-type]
        self.net, self.method = net, method
        self.exact_potentials = bool(exact_potentials)
        self.drop_fraction, self.window = float(drop_fraction), window
        self.prior_name = prior_name
        setattr(self, prior_name, prior)
        self.likelihood = likelihoods.get(likelihood, self.x_dim, **(likelihood_kw or {}))
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())
        self.encoder, self.decoder = nets.build_frame_networks(
            net, self.x_dim, self.z_dim, hidden, self.likelihood.param_size, image_shape
        )

    @property
    def state_prior(self) -> Any:
        """The prior object (registered under ``prior_name``)."""
        return getattr(self, self.prior_name)

    def shared_parameters(self) -> tuple[str, ...]:
        """Pyro names (prefixes) of the parameters meant to feed both the model and the guide:
        the prior's, since the guide is the prior times the encoder's potentials (and, with
        ``exact_potentials``, the decoder's and the likelihood's: the potentials are the
        emission). :func:`pvae.protocol.param_split` does not warn about them."""
        shared = [f"{self._pyro_name}.{self.prior_name}"]
        if self.exact_potentials:
            shared += [f"{self._pyro_name}.decoder", f"{self._pyro_name}.likelihood"]
        return tuple(shared)

    # -- pieces -------------------------------------------------------------------------------
    def _frames(self, values: Tensor) -> Tensor:
        """``values (B, T, *event_shape)`` as ``(B, T, x_dim)``, checked."""
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError("values must be a floating-point tensor (B, T, *event_shape)")
        if values.dim() < 3 or math.prod(values.shape[2:]) != self.x_dim:
            raise ValueError(
                f"values must have shape (B, T, *event_shape) with prod(event_shape) = "
                f"{self.x_dim}, got {tuple(values.shape)}"
            )
        return values.reshape(*values.shape[:2], self.x_dim)

    def _prepare(
        self, values: Tensor, times: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Any, Tensor]:
        """Frames ``(B, T, x_dim)`` (zero at hidden frames, which may hold NaN: replaced before
        any arithmetic), the prior's grid of ``times`` and the ``(B, T)`` bool mask (all True
        when None)."""
        x = self._frames(values)
        B, T = x.shape[:2]
        grid = self.state_prior.grid(times, x)
        if mask is None:
            return x, grid, torch.ones((B, T), dtype=torch.bool, device=x.device)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = observed), got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.shape != (B, T):
            raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x, grid, mask

    def _trajectory_prior(self, num_steps: int, grid: Any) -> StateSpacePrior:
        return self.state_prior.trajectory(grid, num_steps, self.method)

    def _emission_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(C H, d, R)`` of the linear-Gaussian decoder on the state, R = diag(scale^2)."""
        assert isinstance(self.decoder, nn.Linear)
        scale = self.likelihood.scale.expand(self.x_dim)  # type: ignore[operator]
        H = self.state_prior.observation_matrix()
        matrix = self.decoder.weight if H is None else self.decoder.weight @ H
        return matrix, self.decoder.bias, torch.diag_embed(scale.pow(2))

    def _posterior(self, x: Tensor, grid: Any, mask: Tensor | None) -> KalmanSmoothedPosterior:
        """``q(z | y)`` for frames ``x (B, T, x_dim)`` on ``grid``; batch shape ``(B,)``."""
        prior = self._trajectory_prior(x.shape[-2], grid)
        if self.exact_potentials:
            C, d, R = self._emission_parameters()
            return KalmanSmoothedPosterior(prior, x - d, C, R, mask=mask)
        loc, scale = self.encoder(x)
        H = self.state_prior.observation_matrix()
        if H is None:
            return KalmanSmoothedPosterior.from_diagonal_potentials(prior, loc, scale, mask=mask)
        cov = torch.diag_embed(scale.pow(2))
        return KalmanSmoothedPosterior(prior, loc, H.to(loc.dtype), cov, mask=mask)

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

    def _register(self, part: str) -> None:
        pyro.module(f"{self._pyro_name}.{self.prior_name}", self.state_prior)
        if part == "decoder" or self.exact_potentials:
            pyro.module(f"{self._pyro_name}.decoder", self.decoder)
            if self._likelihood_learns:
                pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        if part == "encoder" and not self.exact_potentials:
            pyro.module(f"{self._pyro_name}.encoder", self.encoder)

    # -- the pair -----------------------------------------------------------------------------
    def model(self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None):
        """p(y, z) for a batch of sequences; frames are scored where ``mask`` is True."""
        x, grid, mask = self._prepare(values, times, mask)
        self._register("decoder")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._trajectory_prior(x.shape[1], grid))
            if self.net == "linear":
                C, d, R = self._emission_parameters()
                emission = LinearGaussianEmission(z, C, d, R, mask=mask, latent_site="z")
                pyro.sample("x", emission, obs=x)
            else:
                frames = self.likelihood(self.decoder(z[..., : self.z_dim])).to_event(1)
                pyro.sample("x", frames.mask(mask).to_event(1), obs=x)

    def guide(self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None):
        """q(z | y): the prior times the encoder's potentials at the observed frames (while
        training with ``drop_fraction > 0``, random windows are withheld from the encoder)."""
        x, grid, mask = self._prepare(values, times, mask)
        self._register("encoder")
        if self.training and self.drop_fraction > 0:
            mask = self._drop_windows(mask)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self._posterior(x, grid, mask))

    # -- the SequenceVAE protocol (no engine needs these) -------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Mean of p(y_t | z_t) per step, ``(..., x_dim)`` for ``z (..., z_dim)`` (the first
        ``z_dim`` coordinates of the state)."""
        if self.net == "linear":
            return self.decoder(z)
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def impute(
        self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Fill the hidden frames: the observed frames as given, the others the decoded
        smoothed posterior mean; shape of ``values`` ``(B, T, *event_shape)``. Hidden frames
        may hold anything, NaN included (they are never read). ``times (B, T)`` or ``(T,)``,
        ``mask (B, T)`` bool, True = observed (None: every frame)."""
        times, mask = legacy_frame_order(times, mask, "impute")
        x, grid, mask = self._prepare(values, times, mask)
        mean = self.decode(self._posterior(x, grid, mask).mean[..., : self.z_dim])
        return torch.where(mask[..., None], x, mean).reshape(values.shape)

    @torch.no_grad()
    def forecast(
        self,
        values: Tensor,
        steps: int,
        times: Tensor | None = None,
        mask: Tensor | None = None,
        gap: float | None = None,
    ) -> Tensor:
        """Decoded means of the next ``steps`` frames after each sequence,
        ``(B, steps, *event_shape)``: the last smoothed state mean ``m`` rolled forward by the
        prior, ``A^k m`` with ``A`` the prior's transition over ``gap`` (default: the prior's
        unit of time)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if gap is not None and not validation.finite_float(gap, "gap") > 0:
            raise ValueError(f"gap must be a finite positive number, got {gap!r}")
        times, mask = legacy_frame_order(times, mask, "forecast")
        x, grid, mask = self._prepare(values, times, mask)
        state = self._posterior(x, grid, mask).mean[..., -1, :]
        A = self.state_prior.transition_matrix(gap)
        states = []
        for _ in range(steps):
            state = state @ A.mT
            states.append(state)
        paths = torch.stack(states, -2)[..., : self.z_dim]
        return self.decode(paths).reshape(x.shape[0], steps, *values.shape[2:])

    @torch.no_grad()
    def sample(self, num_steps: int, num_samples: int = 1, times: Tensor | None = None) -> Tensor:
        """Decoded means of paths drawn from the prior, ``(num_samples, num_steps, x_dim)``,
        at ``times (num_steps,)`` (None: the prior's default spacing)."""
        num_steps, times = legacy_sample_order(num_steps, times)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        num_samples = validation.positive_int(num_samples, "num_samples")
        if times is not None and (not isinstance(times, Tensor) or times.shape != (num_steps,)):
            raise ValueError(f"times must be a tensor of shape ({num_steps},)")
        like = next(self.state_prior.parameters())
        grid = self.state_prior.grid(times, like.new_zeros(1, num_steps, 1))
        z = self._trajectory_prior(num_steps, grid).sample(torch.Size([num_samples]))
        return self.decode(z[..., : self.z_dim])


class StructuredVAE(StateSpaceVAE):
    """Structured VAE: LDS prior, per-frame decoder, encoder potentials smoothed exactly.

    A :class:`StateSpaceVAE` with the :class:`LinearDynamicsPrior` registered as ``dynamics``
    (the state is the latent: ``z_dim`` = D, potentials on the whole state).

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
    :param time_scale: the time unit of the dynamics, in the units of ``times`` (e.g. the
        usual gap between frames): the prior is initialised at ``A = 0.95 I``, ``Q = 0.1 I``
        over one ``time_scale``, and ``times=None`` means frames ``time_scale`` apart.
    :param dynamics_init: the start of the dynamics, ``"decay"`` (``A = 0.95 I`` over one
        ``time_scale``) or ``"rotation"`` (2x2 rotation blocks of modulus 0.99 turning by
        ``k pi / (2 (D // 2 + 1))`` per ``time_scale``, stationary covariance I, see
        ``LinearDynamicsPrior.set_rotations``), for oscillating data. From a decay start
        the eigenvalues must first turn complex, which can take most of a short run.
    :param name: prefix of the model's names in Pyro's parameter store (unique per instance).
    """

    dynamics: LinearDynamicsPrior

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
        time_scale: float = 1.0,
        name: str = "svae",
        dynamics_init: str = "decay",
    ):
        time_scale = validation.finite_float(time_scale, "time_scale")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be a finite positive number, got {time_scale!r}")
        if dynamics_init not in DYNAMICS_INITS:
            raise ValueError(
                f"dynamics_init must be one of {DYNAMICS_INITS}, got {dynamics_init!r}"
            )
        super().__init__(
            x_dim,
            LinearDynamicsPrior(int(z_dim), time_scale, dynamics_init),
            "dynamics",
            hidden=hidden,
            likelihood=likelihood,
            net=net,
            image_shape=image_shape,
            exact_potentials=exact_potentials,
            drop_fraction=drop_fraction,
            window=window,
            method=method,
            likelihood_kw=likelihood_kw,
            name=name,
        )

    def prior(self, num_steps: int, gaps: Tensor | None = None) -> StateSpacePrior:
        """``p(z_1..z_T)`` (event shape ``(T, z_dim)``) on a grid with ``gaps`` between
        frames: ``None`` (every gap ``time_scale``), ``(1,)`` (one gap shared by every step),
        ``(T-1,)`` (one grid for the batch) or ``(B, T-1)`` (batch shape ``(B,)``)."""
        return self._trajectory_prior(num_steps, gaps)

    def _check(
        self, values: Tensor, mask: Tensor | None, times: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Frames flattened to ``(B, T, x_dim)`` (zero at hidden frames), the ``(B, T)`` bool
        mask (all True when None) and the gaps between frames for :meth:`prior` (None when
        ``times`` is)."""
        x, gaps, mask = self._prepare(values, times, mask)
        return x, mask, gaps

    def posterior(
        self, x: Tensor, mask: Tensor, gaps: Tensor | None = None
    ) -> KalmanSmoothedPosterior:
        """``q(z | y)`` for frames ``x (B, T, x_dim)`` with potentials at the True steps of
        ``mask``, on the grid of ``gaps`` (see :meth:`prior`); batch shape ``(B,)``."""
        return self._posterior(x, gaps, mask)


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import Choice, ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.metrics import imputation_metrics  # noqa: E402
from pvae.nets import conv_image_shape  # noqa: E402


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    drop_fraction: float,
    dynamics_init: str,
) -> StructuredVAE:
    times = ds.train[1]  # the dynamics' time unit: the median gap between training frames
    gaps = times[:, 1:] - times[:, :-1] if times.shape[-1] > 1 else times.new_ones(1)
    return StructuredVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=conv_image_shape(ds, net),
        drop_fraction=drop_fraction,
        time_scale=float(gaps.median()),
        dynamics_init=dynamics_init,
    )


CARD = ModelCard(
    name="svae",
    description="structured VAE: linear dynamical prior, encoder potentials smoothed exactly "
    "(Johnson et al. 2016; Zhao & Linderman 2023)",
    factory=_build,
    accepts=("sequences",),
    options=(
        Option.of(StructuredVAE, "drop_fraction", Real(0.0, 1.0)),
        Option.of(StructuredVAE, "dynamics_init", Choice(DYNAMICS_INITS)),
    ),
    capabilities=("impute", "forecast", "sample", "per-channel", "state-space"),
    decoder=lambda model: None,  # its latent is a (T, D) path: no traversal of one z
    metrics=imputation_metrics,
    channels={"z": -1},
)
