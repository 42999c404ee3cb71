"""The sparse-GP Bayesian autoencoder, SGP-BAE (Tran, Shahbaba, Mandt and Filippone 2023,
"Fully Bayesian autoencoders with latent sparse Gaussian processes", ICML).

Each datapoint n (a frame, say) comes with an auxiliary input ``t_n`` (its time stamp, or the
angle of a rotating digit), ``(D,)``. Its code ``z_n`` ``(L,)`` is tied to the others through a
sparse Gaussian-process prior over the auxiliary inputs, and the decoder's weights carry a prior
too; everything is sampled jointly by SGHMC (:class:`pvae.inference.SGHMC`):

    ell ~ LogNormal(log ell_0, sigma_ell)  (D,)    kernel length scales        site "lengthscale"
    s2  ~ LogNormal(log s2_0, sigma_s2)            kernel variance             site "variance"
    u_l ~ N(0, K_uu)                 (M,)          inducing values, l = 1..L   site "u" (L, M)
    z_nl | u_l ~ N(K_nu K_uu^{-1} u_l, k_nn - Q_nn + jitter)                   site "z" (N, L)
    W   ~ N(0, prior_scale^2)                      decoder weights and biases  sites "decoder.{i}.*"
    x_n | z_n ~ p(x_n | decoder_W(z_n))            likelihood by name (:mod:`pvae.likelihoods`)

with ``K_uu = k(Z_u, Z_u) + jitter I`` on M inducing inputs ``Z_u`` (fixed), ``K_nu = k(t_n,
Z_u)``, ``Q_nn = K_nu K_uu^{-1} K_un`` and the kernel ``k(t, t') = s2 k_1(t / ell, t' / ell)``,
``k_1`` a gpytorch kernel of unit length scale (``"rbf"``, ``"matern12"/"32"/"52"``,
``"cauchy"``, as :func:`pvae.gp.gp_kernel` builds them). The conditional of z given u
is FITC's: per datapoint and channel, independently, with the diagonal of the Nystrom residual as
its variance (:func:`fitc_conditional`); with M = N inducing inputs at the data inputs it is the
exact GP. Hyper-parameters share one kernel across the L channels. The sampler works in
unconstrained space (log ell, log s2), Jacobians included.

Per-datapoint codes sit inside ``pyro.plate("data")``. SGHMC samples them only when every step
sees every datapoint (``batch_size >= N`` in :func:`pvae.sample`); under minibatching it refuses
them. So SGP-BAE runs with full batches, for a few hundred datapoints; the paper's minibatched
scheme (codes re-drawn per batch given u) is not implemented.

After sampling, an amortised encoder (an MLP, :meth:`SGPBAE.fit_encoder`) is regressed by mean
squared error onto the posterior-mean codes, giving :meth:`SGPBAE.encode` for new data. A frame
that is missing has no x but a known auxiliary input: :meth:`SGPBAE.predict_codes` draws its code
from the GP conditional given each sampled u, and :meth:`SGPBAE.impute` decodes it, averaging the
decoded means over the posterior draws.

The codes depend on the auxiliary input and on nothing else (up to the FITC residual), so the
model suits data in which one object varies along the input (one digit turning); several
objects need extra, non-GP channels, which this version leaves out.

``model(x, t)``: ``x (B, x_dim)`` (or None, to sample), ``t (B, D)`` or ``(B,)``.
:func:`frames_and_inputs` flattens a :class:`pvae.data.SequenceSplit` into observed frames and
their auxiliary inputs (time stamps, or the true angles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import Tensor, nn

from pvae import likelihoods, nets
from pvae.gp import KERNELS, exact_gp_settings, gp_kernel

from .bayesian_ae import _positive, bayesian_layers, read_weights, run_layers

__all__ = [
    "SGPBAE",
    "fitc_conditional",
    "frames_and_inputs",
    "latent_r2",
]


# ---------------------------------------------------------------------------------------------
# The sparse GP conditional
# ---------------------------------------------------------------------------------------------


def fitc_conditional(
    k_uu: Tensor, k_un: Tensor, k_nn_diagonal: Tensor, jitter: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The FITC conditional of GP values f_n given inducing values u ~ N(0, K_uu):
    ``f_n | u ~ N(A_n u, k_nn - Q_nn + jitter)`` independently over n.

    :param k_uu: ``(M, M)``, positive definite (jitter already added).
    :param k_un: ``(M, N)``.
    :param k_nn_diagonal: ``(N,)``, the prior variances ``k(t_n, t_n)``.
    :param jitter: added to the conditional variances.
    :returns: ``A = K_nu K_uu^{-1}`` ``(N, M)`` and the variances ``(N,)`` (the Nystrom residual
        ``k_nn - diag(K_nu K_uu^{-1} K_un)``, clamped at 0, plus ``jitter``).
    """
    cholesky = torch.linalg.cholesky(k_uu)
    projection = torch.cholesky_solve(k_un, cholesky)  # K_uu^{-1} K_un, (M, N)
    residual = k_nn_diagonal - (k_un * projection).sum(0)
    return projection.mT, residual.clamp(min=0.0) + jitter


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SGPBAE(PyroModule):
    """A fully Bayesian autoencoder with a latent sparse GP prior over auxiliary inputs.

    :param x_dim: data dimension (flattened).
    :param z_dim: L, code channels (each a GP over the auxiliary input).
    :param inducing_inputs: Z_u, the M fixed inducing inputs, ``(M, D)`` or ``(M,)`` (D = 1).
    :param hidden: hidden widths of the Bayesian decoder (an MLP with tanh, built from
        :func:`pvae.models.bayesian_ae.bayesian_layers`: the weight priors of BayesianAE).
    :param likelihood: a likelihood of :mod:`pvae.likelihoods` without parameters (a sampler
        learns none): ``"continuous_bernoulli"``, ``"bernoulli"``, ``"gaussian"`` with a fixed
        ``likelihood_kw={"scale": ...}``, ...
    :param kernel: one of ``"rbf"``, ``"matern12"``, ``"matern32"``, ``"matern52"``,
        ``"cauchy"``.
    :param length_scale: ell_0, the prior median of every length scale (input units).
    :param variance: s2_0, the prior median of the kernel variance.
    :param hyper_prior_scale: sigma, the standard deviation of log ell and log s2 in the prior.
    :param prior_scale: standard deviation of the decoder weights' prior.
    :param jitter: added to K_uu's diagonal and to the conditional variances of the codes.
    :param encoder_hidden: hidden widths of the amortised encoder (:meth:`fit_encoder`).
    """

    base_kernel: Any  # k_1, a gpytorch kernel

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        inducing_inputs: Tensor,
        hidden: Sequence[int] = (32,),
        likelihood: str = "continuous_bernoulli",
        kernel: str = "rbf",
        length_scale: float = 1.0,
        variance: float = 1.0,
        hyper_prior_scale: float = 0.5,
        prior_scale: float = 1.0,
        jitter: float = 1e-4,
        encoder_hidden: Sequence[int] = (64,),
        likelihood_kw: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        for label, value in (("x_dim", x_dim), ("z_dim", z_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if not isinstance(inducing_inputs, Tensor) or not inducing_inputs.is_floating_point():
            raise TypeError(
                f"inducing_inputs must be a floating tensor (M, D) or (M,), got "
                f"{type(inducing_inputs).__name__}"
            )
        inducing = inducing_inputs[:, None] if inducing_inputs.dim() == 1 else inducing_inputs
        if inducing.dim() != 2 or inducing.shape[0] < 1 or inducing.shape[1] < 1:
            raise ValueError(
                f"inducing_inputs must be (M, D) or (M,) with M >= 1, got shape "
                f"{tuple(inducing_inputs.shape)}"
            )
        if not bool(torch.isfinite(inducing).all()):
            raise ValueError("inducing_inputs must be finite")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.x_dim, self.z_dim = x_dim, z_dim
        self.input_dim = int(inducing.shape[1])
        self.register_buffer("inducing_inputs", inducing.detach().clone())
        self.length_scale = _positive(length_scale, "length_scale")
        self.variance = _positive(variance, "variance")
        self.hyper_prior_scale = _positive(hyper_prior_scale, "hyper_prior_scale")
        self.jitter = _positive(jitter, "jitter")
        prior_scale = _positive(prior_scale, "prior_scale")
        # k_1: unit length scale and variance; the sampled ell and s2 enter as t / ell and s2 k_1.
        self.kernel = kernel
        self.base_kernel = gp_kernel(kernel, length_scale=1.0, scale=1.0).base_kernel
        for parameter in self.base_kernel.parameters():
            parameter.requires_grad_(False)
        self.likelihood = likelihoods.get(likelihood, x_dim, **dict(likelihood_kw or {}))
        if any(True for _ in self.likelihood.parameters()):
            raise ValueError(
                f"likelihood {likelihood!r} has parameters, which a sampler does not learn; "
                "fix them (e.g. likelihood_kw={'scale': 0.1} for 'gaussian')"
            )
        sizes = (z_dim, *nets._as_hidden(hidden), x_dim * self.likelihood.param_size)
        # the Bayesian decoder: BayesianAE's layers (sites "decoder.{i}.weight" / ".bias")
        self.decoder = bayesian_layers(sizes, prior_scale)
        self.activation = nn.Tanh()
        self.encoder = nets.MLP(x_dim, nets._as_hidden(encoder_hidden), z_dim, nn.Tanh)

    # -- the kernel -----------------------------------------------------------------------------
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SGPBAE:
        """After a change of dtype or device (``.double()``, ``.to(...)``), set k_1's fixed
        constants again in the new dtype: gpytorch stores them as raw parameters, so a cast
        would keep float32's rounding of 1 in a float64 kernel."""
        super()._apply(fn, *args, **kwargs)
        with torch.no_grad():  # gp_kernel's Cauchy is an RQ kernel, alpha 1, length l / sqrt(2)
            cauchy = self.kernel == "cauchy"
            self.base_kernel.lengthscale = 1 / math.sqrt(2) if cauchy else 1.0
            if cauchy:
                self.base_kernel.alpha = 1.0
        return self

    def kernel_matrix(self, a: Tensor, b: Tensor, lengthscale: Tensor, variance: Tensor) -> Tensor:
        """``s2 k_1(a / ell, b / ell)``: ``(P, Q)`` for inputs ``a (P, D)``, ``b (Q, D)``."""
        with exact_gp_settings():
            k = self.base_kernel(a / lengthscale, b / lengthscale).to_dense()
        return variance * k

    def _conditional(
        self, t: Tensor, lengthscale: Tensor, variance: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """K_uu (jitter added), and the FITC projection ``(N, M)`` and variances ``(N,)``."""
        z_u = self.inducing_inputs.to(t.dtype)
        eye = torch.eye(z_u.shape[0], dtype=t.dtype, device=t.device)
        k_uu = self.kernel_matrix(z_u, z_u, lengthscale, variance) + self.jitter * eye
        k_un = self.kernel_matrix(z_u, t, lengthscale, variance)
        # every kernel here is stationary with k_1(t, t) = 1: k(t_n, t_n) = s2
        k_nn = variance * torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
        projection, conditional_variance = fitc_conditional(k_uu, k_un, k_nn, self.jitter)
        return k_uu, projection, conditional_variance

    def _check_inputs(self, t: Any, name: str = "t") -> Tensor:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (B, D) or (B,)")
        t = t[:, None] if t.dim() == 1 else t
        if t.dim() != 2 or t.shape[1] != self.input_dim:
            raise ValueError(
                f"{name} must be (B, {self.input_dim}) (or (B,) when D = 1), the inducing "
                f"inputs' dimension; got shape {tuple(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite")
        return t

    # -- the generative model -------------------------------------------------------------------
    def model(self, x: Tensor | None, t: Tensor) -> Tensor:
        """The generative model above; returns the codes ``(B, L)``.

        :param x: ``(B, x_dim)`` observed data, or None to sample it.
        :param t: ``(B, D)`` or ``(B,)``, the auxiliary inputs of the B datapoints.
        """
        t = self._check_inputs(t)
        if x is not None and (not isinstance(x, Tensor) or x.shape != (t.shape[0], self.x_dim)):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, x_dim) = ({t.shape[0]}, {self.x_dim}), got {shape}")
        log_ell = t.new_full((self.input_dim,), math.log(self.length_scale))
        lengthscale = pyro.sample(
            "lengthscale", dist.LogNormal(log_ell, self.hyper_prior_scale).to_event(1)
        )
        log_s2 = t.new_tensor(math.log(self.variance))
        variance = pyro.sample("variance", dist.LogNormal(log_s2, self.hyper_prior_scale))
        k_uu, projection, conditional_variance = self._conditional(t, lengthscale, variance)
        zeros = t.new_zeros(self.z_dim, k_uu.shape[0])
        u = pyro.sample("u", dist.MultivariateNormal(zeros, covariance_matrix=k_uu).to_event(1))
        loc = u @ projection.mT  # (L, B)
        data = pyro.plate("data", t.shape[0])
        with data:
            z = pyro.sample(
                "z", dist.Normal(loc.mT, conditional_variance.sqrt()[:, None]).to_event(1)
            )
        params = self._decoder(z)  # outside the plate: the weights are global sites
        with data:
            pyro.sample("x", self.likelihood(params).to_event(1), obs=x)
        return z

    @pyro_method
    def _decoder(self, z: Tensor) -> Tensor:
        """The likelihood's parameters ``(B, x_dim * param_size)`` from codes ``z (B, L)``, each
        decoder weight site read once (in the module's Pyro context, so the sites are named)."""
        return run_layers(z, read_weights(self.decoder), self.activation)

    # -- after sampling -------------------------------------------------------------------------
    def _draws(self, samples: Mapping[str, Tensor], num_draws: int | None) -> dict[str, Tensor]:
        """The draws ``(S, ...)`` of every site; ``num_draws`` evenly spaced ones (all when
        None)."""
        missing = [n for n in ("lengthscale", "variance", "u", "z") if n not in samples]
        if missing:
            raise ValueError(f"the posterior lacks the sites {missing} of this model")
        flat = dict(samples)
        total = flat["u"].shape[0]
        if num_draws is not None:
            index = torch.linspace(0, total - 1, min(num_draws, total)).round().long()
            flat = {name: value[index] for name, value in flat.items()}
        return flat

    @staticmethod
    def _flat_samples(samples: Any) -> Mapping[str, Tensor]:
        if hasattr(samples, "flat"):  # a pvae.sampling.Posterior
            return samples.flat()
        if not isinstance(samples, Mapping):
            raise TypeError("posterior must be a pvae.Posterior or a mapping of draws")
        return samples

    def predict_codes(self, posterior: Any, t: Tensor, num_draws: int | None = None) -> Tensor:
        """Codes at new auxiliary inputs from the GP conditional given each draw of u:
        ``(S, B, L)``, the FITC mean ``K_*u K_uu^{-1} u`` of every draw (no residual noise).

        :param posterior: a :class:`pvae.Posterior` of this model, or its ``flat()`` draws.
        :param t: ``(B, D)`` or ``(B,)`` inputs.
        """
        t = self._check_inputs(t)
        draws = self._draws(self._flat_samples(posterior), num_draws)
        codes = []
        with torch.no_grad():
            for s in range(draws["u"].shape[0]):
                ell, s2 = draws["lengthscale"][s].to(t), draws["variance"][s].to(t)
                _, projection, _ = self._conditional(t, ell, s2)
                codes.append(draws["u"][s].to(t) @ projection.mT)
        return torch.stack(codes).mT

    def decode(self, posterior: Any, z: Tensor, num_draws: int | None = None) -> Tensor:
        """The likelihood's mean of x given codes ``z (S, B, L)`` (one code set per draw) or
        ``(B, L)`` (shared by every draw), averaged over the posterior draws of the decoder's
        weights: ``(B, x_dim)``."""
        draws = self._draws(self._flat_samples(posterior), num_draws)
        names = [(f"decoder.{i}.weight", f"decoder.{i}.bias") for i in range(len(self.decoder))]
        missing = [n for pair in names for n in pair if n not in draws]
        if missing:
            raise ValueError(f"the posterior lacks the decoder sites {missing} of this model")
        num = draws["u"].shape[0]
        if z.dim() == 2:
            z = z.expand(num, *z.shape)
        if z.dim() != 3 or z.shape[0] != num or z.shape[-1] != self.z_dim:
            raise ValueError(f"z must be (B, {self.z_dim}) or ({num}, B, {self.z_dim})")
        means = []
        with torch.no_grad():
            for s in range(num):
                weights = [(draws[w][s].to(z), draws[b][s].to(z)) for w, b in names]
                means.append(self.likelihood.mean(run_layers(z[s], weights, self.activation)))
        return torch.stack(means).mean(0)

    def impute(self, posterior: Any, t: Tensor, num_draws: int | None = None) -> Tensor:
        """Frames at auxiliary inputs ``t`` without data (e.g. missing frames): the GP
        conditional's codes of every draw (:meth:`predict_codes`), decoded with that draw's
        weights, averaged: ``(B, x_dim)``."""
        z = self.predict_codes(posterior, t, num_draws)
        return self.decode(posterior, z, num_draws)

    def fit_encoder(
        self,
        x: Tensor,
        codes: Tensor,
        steps: int = 500,
        lr: float = 1e-2,
        seed: int = 0,
    ) -> float:
        """Train the amortised encoder (full batch, Adam) by mean squared error onto ``codes``
        ``(N, L)`` (typically the posterior mean of site "z") from ``x`` ``(N, x_dim)``;
        returns the final mean squared error."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"x must be (N, {self.x_dim})")
        if not isinstance(codes, Tensor) or codes.shape != (x.shape[0], self.z_dim):
            raise ValueError(f"codes must be (N, z_dim) = ({x.shape[0]}, {self.z_dim})")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        lr = _positive(lr, "lr")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.encoder.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        self.encoder.to(x.dtype)
        optimiser = torch.optim.Adam(self.encoder.parameters(), lr=lr)
        target = codes.detach().to(x)
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            optimiser.zero_grad()
            loss = (self.encoder(x) - target).square().mean()
            loss.backward()
            optimiser.step()
        return float(loss.detach())

    def encode(self, x: Tensor) -> Tensor:
        """The amortised encoder's codes ``(B, L)`` for ``x (B, x_dim)`` (after
        :meth:`fit_encoder`)."""
        if not isinstance(x, Tensor) or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must be (B, {self.x_dim})")
        with torch.no_grad():
            out: Tensor = self.encoder(x)
        return out


# ---------------------------------------------------------------------------------------------
# Data and metrics
# ---------------------------------------------------------------------------------------------


def frames_and_inputs(
    split: Sequence[Tensor], aux: Tensor | None = None, observed: bool = True
) -> tuple[Tensor, Tensor]:
    """Flatten a :class:`pvae.data.SequenceSplit` ``(values (N, T, *event), times (N, T), mask
    (N, T))`` into frames ``(F, x_dim)`` and their auxiliary inputs ``(F,)``: the time stamps,
    or ``aux (N, T)`` when given (e.g. ``ds.truth["train"]["angles"]``). ``observed``: the
    observed frames (True) or the missing ones (False, whose values are placeholders)."""
    values, times, mask = split
    inputs = times if aux is None else torch.as_tensor(aux, dtype=values.dtype)
    if inputs.shape != times.shape:
        raise ValueError(f"aux must be (N, T) = {tuple(times.shape)}, got {tuple(inputs.shape)}")
    keep = mask if observed else ~mask
    return values[keep].reshape(int(keep.sum()), -1), inputs[keep].to(values.dtype)


def latent_r2(codes: Tensor, target: Tensor) -> float:
    """R^2 of the least-squares affine regression from ``codes (N, L)`` to ``target (N,)`` or
    ``(N, K)`` (averaged over the K columns): the share of the target's variance that the codes
    explain linearly."""
    target = target[:, None] if target.dim() == 1 else target
    if codes.dim() != 2 or codes.shape[0] != target.shape[0]:
        raise ValueError("codes must be (N, L) and target (N,) or (N, K)")
    design = torch.cat([codes, torch.ones_like(codes[:, :1])], 1).double()
    solution = torch.linalg.lstsq(design, target.double()).solution
    residual = (target.double() - design @ solution).square().sum(0)
    total = (target.double() - target.double().mean(0)).square().sum(0)
    return float((1 - residual / total).mean())
