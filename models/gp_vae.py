"""The GP-VAE with a dense Gaussian-process prior over time (Fortuin et al. 2020).

Generative story, for each sequence n (one datapoint of ``pyro.plate("data")``) with frames
``x_1..x_T`` at time stamps ``t_1..t_T``::

    z_l = (z_{l,1}, ..., z_{l,T}) ~ N(0, K),   K_ij = k(t_i, t_j) + jitter * delta_ij,
                                               independently for each channel l = 1..L
    x_{t,e} | z_t ~ p_theta(x_{t,e} | z_t)     for the observed entries (t, e) only

The kernel k is a gpytorch kernel (:func:`gp_kernel`): ``"cauchy"`` (the paper's choice,
``k(t, t') = s^2 / (1 + (t - t')^2 / l^2)``, gpytorch's ``RQKernel`` with alpha = 1 and
lengthscale ``l / sqrt(2)``), ``"rbf"``, ``"matern12"``, ``"matern32"``, ``"matern52"``; its
hyper-parameters (length scale l, scale s) are fixed or learned (``learn_kernel=True``, then
global: counted once per step, not N/B times). The prior is a Pyro ``MultivariateNormal`` with
event shape ``(T,)`` and batch shape ``(B, L)``, wrapped ``.to_event(1)``: site ``"z"`` has event
shape ``(L, T)`` (channels first, time last).

The covariance is evaluated to a dense ``(T, T)`` tensor per sequence and factorised by one
Cholesky decomposition, inside :func:`exact_gp_settings` (gpytorch's ``max_cholesky_size``
raised and its fast computations off), so nothing ever switches to conjugate gradients or
Lanczos -- gpytorch would by default above 800 points. Cost: O(T^3) time and O(T^2) memory per
sequence (and per channel for the closed-form KL's banded solves). Measured for one ELBO-and-
gradient step (one sequence, two channels, float64, one CPU thread): 0.04 s at T = 100, 0.14 s
at T = 300, 2.3 s at T = 1000 and 26 s (2.4 GB) at T = 2000; beyond about a thousand steps
the dense baseline stops being affordable and the Markovian (state-space) GP prior is
the one to use.

Inference network (guide): per channel a Gaussian over time with a banded precision,

    q(z_l | x) = N(m_l, S_l),   S_l^{-1} = Lambda_l = B_l B_l^T,

``B_l`` upper bidiagonal (:class:`BandedGaussian`): a positive diagonal and a free
superdiagonal, from the encoder. Sampling is one banded triangular solve ``z = m + B^{-T} eps``,
the log-density costs O(T), and the KL to the GP prior is closed form (registered for
:class:`BandedGaussian` against ``MultivariateNormal``), so the ELBO engine uses it. The
encoder sees each frame with zeros at the missing entries: a per-frame MLP, a convolution
along time (width 3), then linear heads for ``m_t``, the diagonal ``B_tt`` and the
superdiagonal ``B_{t,t+1}`` (from the features of frames t and t + 1).

Likelihood: Bernoulli, continuous Bernoulli, Gaussian ... per entry (by name, from
:mod:`pvae.likelihoods`), scored on the observed entries only: an entry counts when its frame
is observed (``mask``) and, when given, its entry of ``observed`` is True (missing pixels).

``model(values, times, mask, observed=None)`` receives a :class:`pvae.data.SequenceSplit`
(``values (B, T, *event_shape)``, ``times (B, T)``, ``mask (B, T)`` bool), optionally followed
by the per-entry mask ``observed (B, T, *event_shape)`` bool; :func:`pvae.data.gp_sets.
with_entry_mask` makes that 4-tuple from the ``hmnist-like`` set. The pair trains with ELBO
and IWAE (and every other variational engine).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

from pvae import likelihoods, nets, validation
from pvae.distributions.banded import BandedGaussian, bidiagonal_solve
from pvae.gp import KERNELS, exact_gp_settings, gp_kernel, kernel_matrix
from pvae.metrics import imputation_error

from ._names import claim
from ._sequence import legacy_sample_order

__all__ = [
    "KERNELS",
    "BandedGaussian",
    "GPVAE",
    "bidiagonal_solve",
    "exact_gp_settings",
    "gp_kernel",
    "imputation_metrics",
    "kernel_matrix",
]

_MIN_DIAGONAL = 1e-3


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class BandedEncoder(nn.Module):
    """Frames ``(B, T, x_dim)`` -> the guide's ``(loc, diagonal, superdiagonal)``, each
    ``(B, L, T)`` (superdiagonal ``(B, L, T - 1)``): a per-frame MLP, a width-3 convolution
    along time, then linear heads (the superdiagonal from the features of frames t and t+1).
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        widths = tuple(hidden)
        if not widths:
            raise ValueError("hidden must name at least one hidden width")
        self.frame = nets.MLP(x_dim, widths[:-1], widths[-1])
        self.temporal = nn.Conv1d(widths[-1], widths[-1], kernel_size=3, padding=1)
        self.marginal = nn.Linear(widths[-1], 2 * z_dim)
        self.coupling = nn.Linear(2 * widths[-1], z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.relu(self.frame(x))  # (B, T, H)
        h = torch.relu(self.temporal(h.transpose(-1, -2))).transpose(-1, -2)
        loc, raw = self.marginal(h).chunk(2, dim=-1)
        diagonal = F.softplus(raw) + _MIN_DIAGONAL
        superdiagonal = self.coupling(torch.cat([h[..., :-1, :], h[..., 1:, :]], -1))
        return loc.mT, diagonal.mT, superdiagonal.mT


class GPVAE(PyroModule):
    """GP-VAE (Fortuin et al. 2020): a GP prior over time per latent channel, a banded-precision
    Gaussian guide, a per-entry likelihood scored on observed entries only.

    :param x_dim: size of one frame (flattened; ``prod(event_shape)``).
    :param z_dim: number of latent channels L.
    :param hidden: hidden widths of the encoder (per-frame MLP then temporal convolution of
        the last width) and of the decoder (reversed).
    :param likelihood: likelihood of an entry by name (:mod:`pvae.likelihoods`).
    :param kernel: the GP kernel by name, one of :data:`KERNELS` (see :func:`gp_kernel`).
    :param length_scale: the kernel's length scale l, in the units of the time stamps.
    :param scale: the kernel's scale s (prior variance ``s^2``).
    :param learn_kernel: learn l and s by the bound (global parameters) instead of fixing them.
    :param jitter: added to the prior covariance's diagonal.
    :param likelihood_kw: extra keywords of the likelihood (e.g. ``{"scale": 0.3}``).
    :param name: prefix of the model's names in Pyro's parameter store (unique per instance).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 4,
        hidden: Sequence[int] = (128,),
        likelihood: str = "continuous_bernoulli",
        kernel: str = "cauchy",
        length_scale: float = 2.0,
        scale: float = 1.0,
        learn_kernel: bool = False,
        jitter: float = 1e-4,
        likelihood_kw: dict | None = None,
        name: str = "gpvae",
    ):
        for label, value in (("x_dim", x_dim), ("z_dim", z_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not isinstance(learn_kernel, bool):
            raise TypeError(f"learn_kernel must be a bool, got {learn_kernel!r}")
        if not (isinstance(jitter, int | float) and math.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"jitter must be a number >= 0, got {jitter!r}")
        kernel_module = gp_kernel(kernel, length_scale, scale)
        super().__init__(claim(name, self))
        self.x_dim, self.z_dim = x_dim, z_dim
        self.kernel_name, self.learn_kernel, self.jitter = kernel, learn_kernel, float(jitter)
        self.kernel = kernel_module
        if not learn_kernel:
            self.kernel.requires_grad_(False)
        self.likelihood = likelihoods.get(likelihood, self.x_dim, **(likelihood_kw or {}))
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())
        self.encoder = BandedEncoder(self.x_dim, self.z_dim, hidden)
        self.decoder = nets.build_decoder(
            "mlp",
            self.z_dim,
            self.x_dim,
            tuple(reversed(tuple(hidden))),
            self.likelihood.param_size,
        )

    # -- pieces -------------------------------------------------------------------------------
    @property
    def length_scale(self) -> Tensor:
        """The kernel's length scale l (for ``"cauchy"``: ``sqrt(2)`` times gpytorch's)."""
        base_kernel: Any = self.kernel.base_kernel
        base = base_kernel.lengthscale.reshape(())
        return base * math.sqrt(2) if self.kernel_name == "cauchy" else base

    @property
    def scale(self) -> Tensor:
        """The kernel's scale s (its output scale is ``s^2``)."""
        kernel: Any = self.kernel
        return kernel.outputscale.reshape(()).sqrt()

    @torch.no_grad()
    def hyperparameters(self) -> dict[str, float]:
        """The kernel's hyper-parameters (learned when ``learn_kernel``): ``length_scale`` l
        and ``scale`` s, shared by the channels."""
        return {"length_scale": float(self.length_scale), "scale": float(self.scale)}

    def prior(self, times: Tensor) -> dist.TorchDistribution:
        """``p(z)`` for ``times (..., T)``: batch ``(...)``, event ``(L, T)`` -- L independent
        ``MultivariateNormal(0, K)`` sharing the Cholesky factor of ``K``."""
        covariance = kernel_matrix(self.kernel, times, self.jitter)
        scale_tril = torch.linalg.cholesky(covariance)
        loc = times.new_zeros(*times.shape[:-1], self.z_dim, times.shape[-1])
        return dist.MultivariateNormal(loc, scale_tril=scale_tril[..., None, :, :]).to_event(1)

    def posterior(self, x: Tensor, observed: Tensor) -> dist.TorchDistribution:
        """``q(z | x)`` for frames ``x (B, T, x_dim)`` (entries where ``observed`` is False are
        shown to the encoder as zeros): batch ``(B,)``, event ``(L, T)``."""
        loc, diagonal, superdiagonal = self.encoder(torch.where(observed, x, 0.0))
        return BandedGaussian(loc, diagonal, superdiagonal).to_event(1)

    def _check(
        self, values: Tensor, times: Tensor | None, mask: Tensor | None, observed: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x (B, T, x_dim)``, ``times (B, T)`` and the entry mask ``(B, T, x_dim)`` (frame
        mask and per-entry mask combined)."""
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError("values must be a floating-point tensor (B, T, *event_shape)")
        if values.dim() < 3 or math.prod(values.shape[2:]) != self.x_dim:
            raise ValueError(
                f"values must have shape (B, T, *event_shape) with prod(event_shape) = "
                f"{self.x_dim}, got {tuple(values.shape)}"
            )
        B, T = values.shape[:2]
        x = values.reshape(B, T, self.x_dim)
        if times is None:
            times = torch.arange(T, dtype=x.dtype, device=x.device).expand(B, T)
        elif not isinstance(times, Tensor) or times.shape != (B, T):
            raise ValueError(
                f"times must be a tensor of shape (B, T) = {(B, T)}, got "
                f"{tuple(getattr(times, 'shape', ()))}"
            )
        else:
            validation.check_times(times)
        entries = torch.ones_like(x, dtype=torch.bool)
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B, T):
                raise ValueError(
                    f"mask must be a bool tensor of shape (B, T) = {(B, T)} (True = observed)"
                )
            entries = entries & mask[..., None]
        if observed is not None:
            if (
                not isinstance(observed, Tensor)
                or observed.dtype != torch.bool
                or observed.shape != values.shape
            ):
                raise ValueError(
                    f"observed must be a bool tensor shaped like values {tuple(values.shape)} "
                    "(True = entry observed)"
                )
            entries = entries & observed.reshape(B, T, self.x_dim)
        return x, times.to(x.dtype), entries

    def _register(self, part: str) -> None:
        if part == "decoder":
            pyro.module(f"{self._pyro_name}.decoder", self.decoder)
            if self.learn_kernel:
                with warnings.catch_warnings():  # the Cauchy kernel's alpha is fixed at 1
                    warnings.filterwarnings("ignore", "base_kernel.raw_alpha was not registered")
                    pyro.module(f"{self._pyro_name}.kernel", self.kernel)
            if self._likelihood_learns:
                pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        else:
            pyro.module(f"{self._pyro_name}.encoder", self.encoder)

    # -- the pair -----------------------------------------------------------------------------
    def model(
        self,
        values: Tensor,
        times: Tensor | None = None,
        mask: Tensor | None = None,
        observed: Tensor | None = None,
    ):
        """p(x, z) for a batch of sequences; entries are scored where the frame is observed
        (``mask``) and the entry is observed (``observed``)."""
        x, times, entries = self._check(values, times, mask, observed)
        self._register("decoder")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(times))  # (..., B, L, T)
            frames = self.likelihood(self.decoder(z.mT))  # batch (..., B, T, x_dim)
            pyro.sample("x", frames.mask(entries).to_event(2), obs=x)

    def guide(
        self,
        values: Tensor,
        times: Tensor | None = None,
        mask: Tensor | None = None,
        observed: Tensor | None = None,
    ):
        """q(z | x): per channel a Gaussian over time with a bidiagonal precision factor."""
        x, _, entries = self._check(values, times, mask, observed)
        self._register("encoder")
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x, entries))

    # -- conveniences (no engine needs them) --------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Mean of ``p(x_t | z_t)`` per step, ``(..., x_dim)`` for ``z (..., z_dim)``."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def impute(
        self,
        values: Tensor,
        times: Tensor | None = None,
        mask: Tensor | None = None,
        observed: Tensor | None = None,
    ) -> Tensor:
        """The observed entries as given, the others the decoded posterior mean; shape of
        ``values`` (:class:`pvae.protocol.SequenceVAE`, plus the per-entry mask ``observed``,
        True = entry observed, shaped like ``values``)."""
        x, _, entries = self._check(values, times, mask, observed)
        mean = self.decode(self.posterior(x, entries).mean.mT)
        return torch.where(entries, x, mean).reshape(values.shape)

    @torch.no_grad()
    def forecast(
        self,
        values: Tensor,
        steps: int,
        times: Tensor | None = None,
        mask: Tensor | None = None,
        observed: Tensor | None = None,
        gap: float = 1.0,
    ) -> Tensor:
        """Decoded means of the ``steps`` frames after each sequence, ``(B, steps,
        *event_shape)``, at stamps ``t_T + gap, t_T + 2 gap, ...``: the GP's conditional mean
        ``K_fp K_pp^{-1} m`` of the future values given the posterior mean ``m`` of the
        sequence's own (``K`` the prior covariance over past and future stamps, jitter on its
        diagonal); exact for the mean since ``E[z_f | z_p]`` is linear in ``z_p``."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        gap = validation.finite_float(gap, "gap")
        if not gap > 0:
            raise ValueError(f"gap must be a finite positive number, got {gap!r}")
        x, times, entries = self._check(values, times, mask, observed)
        T = x.shape[1]
        ahead = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device) * gap
        stamps = torch.cat([times, times[:, -1:] + ahead], -1)  # (B, T + steps)
        covariance = kernel_matrix(self.kernel, stamps, self.jitter)
        cholesky = torch.linalg.cholesky(covariance[:, :T, :T])
        mean = self.posterior(x, entries).mean  # (B, L, T)
        weights = torch.cholesky_solve(mean.mT, cholesky)  # K_pp^{-1} m: (B, T, L)
        future = covariance[:, T:, :T] @ weights  # (B, steps, L)
        return self.decode(future).reshape(x.shape[0], steps, *values.shape[2:])

    @torch.no_grad()
    def sample(self, num_steps: int, num_samples: int = 1, times: Tensor | None = None) -> Tensor:
        """Decoded means of latent paths drawn from the prior at ``times (num_steps,)`` (None:
        ``0, 1, ..., num_steps - 1``), ``(num_samples, num_steps, x_dim)``."""
        num_steps, times = legacy_sample_order(num_steps, times)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if times is None:
            times = torch.arange(num_steps, dtype=next(self.decoder.parameters()).dtype)
        elif not isinstance(times, Tensor) or times.shape != (num_steps,):
            raise ValueError(f"times must be a tensor of shape ({num_steps},)")
        z = self.prior(times).sample(torch.Size([num_samples]))
        return self.decode(z.mT)


@torch.no_grad()
def imputation_metrics(
    model: GPVAE,
    values: Tensor,
    times: Tensor,
    mask: Tensor,
    observed: Tensor,
    truth: Tensor,
    num_samples: int = 10,
) -> dict[str, float]:
    """Imputation scored on the missing entries (``~(mask & observed)``) against the clean
    frames ``truth`` (shaped like ``values``):

    - ``mse``: :func:`pvae.metrics.imputation_error`'s ``imputation_mse`` (the decoded
      posterior mean of :meth:`GPVAE.impute`);
    - ``nll``: mean over missing entries of ``-log (1/S) sum_s p(x_e | z_s)``, ``z_s ~ q``
      (``S = num_samples``), nats per entry.
    """
    if not isinstance(truth, Tensor) or truth.shape != values.shape:
        raise ValueError(f"truth must be shaped like values {tuple(values.shape)}")
    x, _, entries = model._check(values, times, mask, observed)
    missing = ~entries
    if not bool(missing.any()):
        raise ValueError("no missing entries to score")
    target = truth.reshape(x.shape).to(x.dtype)
    mse = imputation_error(model, (values, times, mask, observed), truth)["imputation_mse"]
    z = model.posterior(x, entries).sample(torch.Size([num_samples]))  # (S, B, L, T)
    log_p = model.likelihood(model.decoder(z.mT)).log_prob(target)  # (S, B, T, x_dim)
    log_mean = torch.logsumexp(log_p, 0) - math.log(num_samples)
    return {"mse": mse, "nll": float(-log_mean[missing].mean())}


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import Choice, ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.metrics import gp_imputation_metrics  # noqa: E402


def _build(
    ds: Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    kernel: str,
    length_scale: float,
    learn_kernel: str,
) -> GPVAE:
    return GPVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        kernel=kernel,
        length_scale=length_scale,
        learn_kernel=learn_kernel == "yes",
    )


def _entry_masked_view(ds: Splits, options: Any) -> Splits:
    """A set with a per-entry mask (``hmnist-like``) as 4-tuple splits ``(values, times,
    mask, observed)``, so that the GP-VAE scores observed entries only; other sequence sets
    as they are."""
    from pvae import data
    from pvae.data import gp_sets

    truth = getattr(ds, "truth", {})
    has_mask = all("observed" in truth.get(split, {}) for split in ("train", "valid", "test"))
    if isinstance(ds, data.SequenceSplits) and has_mask:
        return gp_sets.entry_masked(ds)
    return ds


CARD = ModelCard(
    name="gpvae",
    description="GP-VAE: a dense GP prior over time per latent channel, banded-precision guide "
    "(Fortuin et al. 2020)",
    factory=_build,
    accepts=("sequences",),
    options=(
        Option.of(GPVAE, "kernel", Choice(KERNELS), help="the GP kernel over time"),
        Option.of(GPVAE, "length_scale", Real(0.0, open_below=True)),
        Option.of(GPVAE, "learn_kernel"),
    ),
    capabilities=("impute", "forecast", "sample", "per-channel"),
    prepare=_entry_masked_view,
    decoder=lambda model: None,  # its latent is an (L, T) path: no traversal of one z
    metrics=gp_imputation_metrics,
    channels={"z": -2},  # event (L, T): channels first
)
