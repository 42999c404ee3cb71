"""The Markovian GP-VAE (Zhu et al. 2023): Matérn GP priors over time, smoothed in O(T).

Generative story, for each sequence n (one datapoint of ``pyro.plate("data")``) with frames
``y_1..y_T`` at time stamps ``t_1 < ... < t_T`` (any spacing)::

    f_l(.) ~ GP(0, s_l^2 k_nu(|t - t'| / l_l))    l = 1..L, independent latent channels
    y_t | f(t_t) ~ p_theta(y_t | f(t_t))           for observed t only (decoder per frame)

Each channel is a Matérn GP (``nu`` = 1/2, 3/2 or 5/2) written as a linear SDE with state
``s_l = (f_l, f_l', ...)`` of size ``d = nu + 1/2`` and discretised exactly on the sequence's
own time stamps (:mod:`pvae.gp`: ``A_k = expm(F dt_k)``, ``Q_k = P_inf - A_k P_inf A_k^T``,
``s_1 ~ N(0, P_inf)``). Lengthscales ``l_l`` and variances ``s_l^2`` are learned (softplus
of free parameters).

Latent site. ``"z"`` is the whole SDE state of every channel, event shape ``(T, d L)``,
ordered by derivative first: ``z[..., t, j L + l]`` is the j-th derivative of channel l at
``t_t``, so ``z[..., :L]`` is the GP value ``f (T, L)`` that the decoder reads, and
``channels={"z": -1}`` reports the L values first, then their derivatives. The transition is
block diagonal (channels independent), so the prior is a
:class:`~pvae.distributions.StateSpacePrior` and the guide a
:class:`~pvae.distributions.KalmanSmoothedPosterior`; ELBO (with the registered closed-form
KL), IWAE, ``pvae.log_likelihood`` and :class:`~pvae.inference.KalmanELBO` (exact KL; exact
expected log-likelihood for ``net="linear"``) train the pair unchanged. The Kalman smoother
then costs O(T (d L)^3); for the usual L <= 8 and d <= 3 the small matrices are dominated by
per-step overhead, and the cost stays linear in T.

Inference network (guide): an encoder maps each observed frame to Gaussian potentials on the
GP values, ``N(y~_t | f(t_t), diag(v_t))`` (one per channel), and the guide is the prior times
the potentials, smoothed exactly::

    q(z | y) = p(z) prod_{t observed} N(y~_t | H z_t, diag(v_t)) / Z,    H = [I_L, 0]

Missing frames (``mask`` False) get no potential and are not scored by the likelihood.
``model(values, times, mask)`` receives a :class:`pvae.data.SequenceSplit`: ``values (B, T,
*event_shape)``, ``times (B, T)`` strictly increasing per sequence (None: ``0, 1, ..., T-1``),
``mask (B, T)`` bool. When every sequence has the same stamps the discretisation is computed
once for the batch.

With ``net="linear"`` (``N(y_t | C f_t + c, diag(r^2))``) and ``exact_potentials=True`` the
potentials are the emission itself, so the guide is the exact posterior and every bound is
the Kalman log-likelihood ``log p(y)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvae import gp, validation
from pvae.distributions import KalmanSmoothedPosterior, StateSpacePrior

from .structured import StateSpaceVAE

__all__ = ["MaternPrior", "MaternSDEPrior", "MarkovianGPVAE", "matern_transitions"]

NETS = ("mlp", "conv", "linear")
LENGTHSCALE_FLOOR = 1e-4  # lengthscale = softplus(raw) + floor: nothing below it is reachable
VARIANCE_FLOOR = 1e-6


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


def _channel_blocks(blocks: Tensor) -> Tensor:
    """Per-channel ``(..., L, d, d)`` blocks as one ``(..., d L, d L)`` matrix in the
    derivative-first order: ``out[j L + l, k L + m] = [l == m] blocks[l, j, k]``."""
    L, d = blocks.shape[-3], blocks.shape[-1]
    full = torch.diag_embed(blocks.movedim(-3, -1))  # (..., d, d, L, L)
    return full.transpose(-3, -2).reshape(*blocks.shape[:-3], d * L, d * L)


def matern_transitions(
    nu: float, lengthscale: Tensor, variance: Tensor, gaps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pvae.gp.matern_discretisation` (same arguments, shapes and jitter) with the
    matrix exponential in closed form.

    The Matérn drift is ``F = -lambda I + N`` with ``N`` nilpotent (``N^d = 0``,
    ``lambda = sqrt(2 nu) / l``: the characteristic polynomial is ``(s + lambda)^d``), so
    ``expm(F dt) = exp(-lambda dt) (I + dt N + dt^2 N^2 / 2)``: a few elementwise operations
    per gap instead of a batched Padé exponential, whose backward pass is the costlier part
    of a training step's prior.
    """
    F, P = gp.matern_sde(nu, lengthscale, variance)
    d = F.shape[-1]
    lam = (math.sqrt(2 * nu) / lengthscale).expand(F.shape[:-2])  # (...)
    eye = torch.eye(d, dtype=F.dtype, device=F.device)
    N = F + lam[..., None, None] * eye
    dt = gaps[..., None, None]  # (..., 1 or L, T-1, 1, 1)
    series = eye + dt * N.unsqueeze(-3)
    if d > 2:
        series = series + (0.5 * dt * dt) * (N @ N).unsqueeze(-3)
    A = torch.exp(-lam[..., None] * gaps)[..., None, None] * series
    return A, gp.process_noise(A, P), P


class MaternSDEPrior(nn.Module):
    """L independent Matérn-``nu`` GPs with learned lengthscales and variances, as one
    state-space model on the derivative-first state of size ``d L``.

    ``lengthscale = softplus(raw) + 1e-4`` and ``variance = softplus(raw) + 1e-6``, one per
    channel, ``(L,)``. The initial values must be finite and above these floors (refused
    here, at construction, with the argument's name).
    """

    def __init__(
        self, channels: int, nu: float = 1.5, lengthscale: float = 1.0, variance: float = 1.0
    ) -> None:
        super().__init__()
        self.d = gp.state_dim(nu)
        lengthscale = validation.finite_float(lengthscale, "lengthscale")
        variance = validation.finite_float(variance, "variance")
        for label, value, floor in (
            ("lengthscale", lengthscale, LENGTHSCALE_FLOOR),
            ("variance", variance, VARIANCE_FLOOR),
        ):
            if not value > floor:
                raise ValueError(
                    f"{label} must be finite and greater than {floor:g} (the smallest value "
                    f"the model can represent: softplus(raw) + {floor:g}), got {value!r}"
                )
        self.nu, self.channels = nu, int(channels)
        self.lengthscale_raw = nn.Parameter(
            torch.full((channels,), _inverse_softplus(lengthscale - LENGTHSCALE_FLOOR))
        )
        self.variance_raw = nn.Parameter(
            torch.full((channels,), _inverse_softplus(variance - VARIANCE_FLOOR))
        )

    @property
    def state_dim(self) -> int:
        return self.d * self.channels

    def lengthscale(self) -> Tensor:
        return F.softplus(self.lengthscale_raw) + LENGTHSCALE_FLOOR

    def variance(self) -> Tensor:
        return F.softplus(self.variance_raw) + VARIANCE_FLOOR

    def observation_matrix(self) -> Tensor:
        """``H = [I_L, 0]``, ``(L, d L)``: the GP values out of the state."""
        eye = torch.eye(self.channels, self.state_dim, dtype=self.lengthscale_raw.dtype)
        return eye.to(self.lengthscale_raw.device)

    def state_space(self, times: Tensor, method: str = "sequential") -> StateSpacePrior:
        """The prior over the state trajectory at ``times (..., T)``: batch shape ``(...)``
        (``()`` for a single grid shared by a batch), event shape ``(T, d L)``."""
        gaps = gp.check_times(times)
        A, Q, P = matern_transitions(
            self.nu, self.lengthscale(), self.variance(), gaps.unsqueeze(-2)
        )  # (..., L, T-1, d, d), P (L, d, d)
        if times.shape[-1] == 1:  # a single step: no transition (ssm wants one placeholder)
            A, Q = A.new_zeros(A.shape[:-3] + (1,) + A.shape[-2:]), P.unsqueeze(-3)
        A = _channel_blocks(A.movedim(-4, -3))
        Q = _channel_blocks(Q.movedim(-4, -3))
        P = _channel_blocks(P)
        loc = P.new_zeros(self.state_dim)
        return StateSpacePrior(A, Q, loc, P, times.shape[-1], method=method)

    # -- the prior interface of StateSpaceVAE -----------------------------------------------
    def grid(self, times: Tensor | None, x: Tensor) -> Tensor:
        """The stamps for frames ``x (B, T, ...)``: ``times`` ``(B, T)`` or ``(T,)`` checked
        (strictly increasing) and cast to ``x``'s dtype, ``(T,)`` when every sequence shares
        them; None gives ``0, 1, ..., T-1``."""
        B, T = x.shape[:2]
        if times is None:
            times = torch.arange(T, dtype=x.dtype, device=x.device)
        elif not isinstance(times, Tensor) or not times.is_floating_point():
            raise TypeError("times must be a floating-point tensor (B, T)")
        elif times.shape not in ((B, T), (T,)):
            raise ValueError(f"times must have shape (B, T) = {(B, T)}, got {tuple(times.shape)}")
        gp.check_times(times)
        times = times.to(x.dtype)
        if times.dim() == 2 and bool((times == times[:1]).all()):
            times = times[0]
        return times

    def trajectory(self, times: Tensor, num_steps: int, method: str) -> StateSpacePrior:
        """:meth:`state_space` at ``times`` (``num_steps`` is ``times.shape[-1]``)."""
        return self.state_space(times, method)

    def transition_matrix(self, gap: float | None = None) -> Tensor:
        """``A (d L, d L)`` over one gap (default 1, the spacing of the default stamps)."""
        step = self.lengthscale_raw.new_full((1,), 1.0 if gap is None else float(gap))
        A, _, _ = matern_transitions(self.nu, self.lengthscale(), self.variance(), step)
        return _channel_blocks(A[:, 0])  # (L, 1, d, d) -> (d L, d L)


MaternPrior = MaternSDEPrior
"""The former name of :class:`MaternSDEPrior` (kept for imports)."""


class MarkovianGPVAE(StateSpaceVAE):
    """Markovian GP-VAE: Matérn GP priors per latent channel as SDEs, per-frame decoder,
    encoder potentials smoothed exactly in O(T).

    A :class:`pvae.models.structured.StateSpaceVAE` with the :class:`MaternSDEPrior`
    registered as ``gp`` (the decoder reads the L GP values, the first L of the ``d L``
    state coordinates).

    :param x_dim: size of one frame (flattened; ``prod(event_shape)``).
    :param z_dim: number of latent channels L.
    :param nu: Matérn smoothness, 0.5, 1.5 or 2.5.
    :param hidden: hidden widths of the encoder and decoder networks.
    :param likelihood: likelihood of a frame by name (:mod:`pvae.likelihoods`);
        ``net="linear"`` needs ``"gaussian"``.
    :param net: ``"mlp"``, ``"conv"`` (needs ``image_shape``) or ``"linear"`` (a
        linear-Gaussian decoder, MLP encoder).
    :param image_shape: ``(C, H, W)`` of a frame for the conv nets.
    :param lengthscale: initial lengthscale of every channel (time units of ``times``).
    :param variance: initial variance of every channel.
    :param exact_potentials: (``net="linear"`` only) the guide's potentials are the emission
        itself: the guide is the exact posterior.
    :param method: the smoother's ``"sequential"`` or ``"parallel"`` method.
    :param likelihood_kw: extra keywords of the likelihood (e.g. ``{"scale": 0.3}``).
    :param name: prefix of the model's names in Pyro's parameter store (unique per instance).
    """

    gp: MaternSDEPrior

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 4,
        nu: float = 1.5,
        hidden: Sequence[int] = (128,),
        likelihood: str = "continuous_bernoulli",
        net: str = "mlp",
        image_shape: tuple[int, int, int] | None = None,
        lengthscale: float = 1.0,
        variance: float = 1.0,
        exact_potentials: bool = False,
        method: str = "sequential",
        likelihood_kw: dict | None = None,
        name: str = "mgpvae",
    ):
        if method not in ("sequential", "parallel"):
            raise ValueError(f"method must be 'sequential' or 'parallel', got {method!r}")
        if isinstance(z_dim, bool) or not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"z_dim must be a positive integer, got {z_dim!r}")
        super().__init__(
            x_dim,
            MaternSDEPrior(z_dim, nu, lengthscale, variance),
            "gp",
            hidden=hidden,
            likelihood=likelihood,
            net=net,
            image_shape=image_shape,
            exact_potentials=exact_potentials,
            method=method,
            likelihood_kw=likelihood_kw,
            name=name,
        )

    # -- pieces -------------------------------------------------------------------------------
    def _check(
        self, values: Tensor, times: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Frames ``(B, T, x_dim)`` (zero at hidden frames, which may hold NaN: replaced before
        any arithmetic), time stamps ``(B, T)`` or ``(T,)`` when every sequence shares them,
        and the ``(B, T)`` bool mask."""
        return self._prepare(values, times, mask)

    def hyperparameters(self) -> dict[str, list[float]]:
        """The learned GP hyper-parameters per channel: ``lengthscale`` l_l and ``variance``
        s_l^2, lists of L numbers."""
        with torch.no_grad():
            return {
                "lengthscale": self.gp.lengthscale().tolist(),
                "variance": self.gp.variance().tolist(),
            }

    def prior(self, times: Tensor) -> StateSpacePrior:
        """``p(z)`` at ``times (..., T)``: event shape ``(T, d L)``."""
        return self.gp.state_space(times, self.method)

    def smoothed(
        self, loc: Tensor, scale: Tensor, times: Tensor, mask: Tensor | None = None
    ) -> KalmanSmoothedPosterior:
        """The prior at ``times`` times potentials ``N(loc_t | f_t, diag(scale_t^2))`` on the
        GP values (``loc``, ``scale``: ``(B, T, L)``), smoothed exactly."""
        H = self.gp.observation_matrix().to(loc.dtype)
        cov = torch.diag_embed(scale.pow(2))
        return KalmanSmoothedPosterior(self.prior(times), loc, H, cov, mask=mask)

    def posterior(
        self, x: Tensor, times: Tensor, mask: Tensor | None = None
    ) -> KalmanSmoothedPosterior:
        """``q(z | y)`` for frames ``x (B, T, x_dim)`` at ``times``; batch shape ``(B,)``."""
        return self._posterior(x, times, mask)

    @torch.no_grad()
    def encode(
        self, values: Tensor, times: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Smoothed posterior means and variances of the GP values, ``(B, T, L)`` each."""
        x, times, mask = self._check(values, times, mask)
        q = self.posterior(x, times, mask)
        return q.mean[..., : self.z_dim], q.variance[..., : self.z_dim]


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.metrics import gp_imputation_metrics  # noqa: E402
from pvae.nets import conv_image_shape  # noqa: E402


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    nu: float,
    lengthscale: float,
) -> MarkovianGPVAE:
    return MarkovianGPVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        nu=nu,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=conv_image_shape(ds, net),
        lengthscale=lengthscale,
    )


CARD = ModelCard(
    name="mgpvae",
    description="Markovian GP-VAE: Matérn GP prior per latent channel as an SDE on the "
    "(irregular) time stamps, encoder potentials smoothed exactly in O(T) (Zhu et al. 2023)",
    factory=_build,
    accepts=("sequences",),
    options=(
        Option.of(MarkovianGPVAE, "nu", Real(), choices=gp.NUS),
        Option.of(MarkovianGPVAE, "lengthscale", Real(0.0, open_below=True)),
    ),
    capabilities=("impute", "forecast", "sample", "per-channel", "state-space"),
    decoder=lambda model: None,  # its latent is a (T, d L) state path: no traversal of one z
    metrics=gp_imputation_metrics,
    channels={"z": -1},  # the L GP values, then their derivatives
)
