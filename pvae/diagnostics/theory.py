"""Closed forms for posterior collapse in linear conditional and 2-level hierarchical VAEs
(Dang et al., ICLR 2024, "Beyond Vanilla Variational Autoencoders: Detecting Posterior Collapse
in Conditional and Hierarchical Variational Autoencoders").

Both models are trained on the beta-ELBO with the factor 1/2 of the Gaussian log-likelihood
(the negative of ``pvae.inference.ELBO`` up to a constant; the paper drops the 1/2 from every
term, which leaves the optimum unchanged). Everything below was checked against numerically
optimised models in tests/core/test_theory.py.

Linear CVAE
-----------
For inputs x in R^{d_x} and outputs y in R^{d_y}, latent z in R^{d_z}:

    q(z | x, y) = N(W1 x + W2 y, Sigma)          Sigma diagonal, learnable
    p(z)        = N(0, eta_enc^2 I)
    p(y | x, z) = N(U1 z + U2 x, eta_dec^2 I)

loss = E_q ||y - U1 z - U2 x||^2 / (2 eta_dec^2) + beta KL. With the second moments
Sxx = E[x x^T], Sxy = E[x y^T], Syy = E[y y^T], let theta_1 >= theta_2 >= ... be the
eigenvalues of the residual covariance of y given x,

    E = Syy - Syx Sxx^-1 Sxy.

At a global optimum, mode i (i <= min(d_z, d_y); the others are collapsed) has::

    singular value of U1:   u_i     = sqrt(max(0, theta_i - beta eta_dec^2)) / eta_enc
    encoder std:            sigma_i = sqrt(beta) eta_enc eta_dec / sqrt(theta_i)   if
                                      theta_i > beta eta_dec^2, else eta_enc (collapsed)
    KL of that latent:      KL_i    = 0.5 log(theta_i / (beta eta_dec^2)) if active, else 0

so mode i collapses exactly when theta_i <= beta eta_dec^2: more correlation between x and y
lowers theta and causes more collapse. The KL line is not stated in the paper; it follows from
the optimum (per mode, E[mu^2] / eta_enc^2 = 1 - beta eta_dec^2 / theta_i and sigma_i^2 /
eta_enc^2 = beta eta_dec^2 / theta_i) and is what :func:`pvae.diagnostics.kl_per_dim` measures
at convergence.

Linear 2-level hierarchical VAE
-------------------------------
For data x in R^{d_0}, latents z1 in R^{d_1} and z2 in R^{d_2}:

    q(z1 | x)  = N(W1 x, sigma1^2 I)             sigma1 fixed
    q(z2 | z1) = N(W2 z1, Sigma2)                Sigma2 diagonal learnable, or sigma2^2 I fixed
    p(z2)      = N(0, eta_enc^2 I)
    p(z1 | z2) = N(U2 z2, eta_dec^2 I)
    p(x | z1)  = N(U1 z1, eta_dec^2 I)

loss = E_q ||x - U1 z1||^2 / (2 eta_dec^2) + beta1 E_q[log q(z1|x) - log p(z1|z2)]
       + beta2 E_q KL(q(z2|z1) || p(z2)),

with theta_1 >= theta_2 >= ... the eigenvalues of Sxx = E[x x^T] (the paper writes its
thresholds with the singular values sqrt(theta_i)). The optimum decouples into modes: z1 mode i
meets data mode i and, for i <= d_2, z2 mode i. Per mode, with lambda_i the singular value of
W1 Sxx^{1/2} (how much of the data the z1 encoder passes on) and omega_i that of U2, let
t = lambda^2 + sigma1^2 (the variance of z1 under q) and D = beta1 eta_enc^2 omega^2 +
beta2 eta_dec^2. Minimising over U1, W2 (and Sigma2) in closed form leaves, up to constants,

    2 loss_i = theta_i sigma1^2 / (eta_dec^2 t) + beta1 beta2 t / D + R(D),
    R(D) = beta2 log D                                    (Sigma2 learnable)
    R(D) = sigma2^2 D / (eta_dec^2 eta_enc^2)             (Sigma2 = sigma2^2 I fixed)

over t >= sigma1^2, D >= beta2 eta_dec^2. It has one stationary point inside, a single minimum
along each edge, and the corner, all in closed form, and grows without bound, so its minimum
is one of these four; :func:`linear_hvae_collapse` evaluates them and keeps the best. That
reproduces the paper's two theorems. With Sigma2 learnable (c = eta_dec / eta_enc):

- if sigma1^2 >= (beta2 / beta1) eta_dec^2 (the fixed encoder noise is large):
  lambda^2 = sigma1^2 max(0, theta / (beta2 eta_dec^2) - 1),
  omega^2 = max(sigma1^2 - (beta2/beta1) eta_dec^2,
  sigma1^2 theta / (beta2 eta_dec^2) - (beta2/beta1) eta_dec^2) / eta_enc^2;
  z1 mode i collapses when theta_i <= beta2 eta_dec^2 while z2's mode stays in use (omega > 0,
  modelling z1's encoder noise: it then carries nothing about x): the learnable encoder
  variance is itself a cause of collapse;
- otherwise, if sigma1^2 theta < beta2^2 eta_dec^4 / beta1: omega = 0 (z2 mode collapsed) and
  lambda^2 = max(0, sigma1 sqrt(theta / beta1) - sigma1^2), collapsing when
  theta <= beta1 sigma1^2;
- otherwise both in use, lambda and omega as in the first case.

With Sigma2 = sigma2^2 I fixed, both modes are in use exactly when

    theta > sqrt(beta1 beta2) c sigma1 sigma2
    and sqrt(theta) > beta2 c^2 sigma2^2 / (sqrt(beta1) sigma1)

(the authors' helper code writes the second threshold with sqrt(beta1) in the numerator; the
numerically optimised model follows the form above, and the two agree at beta1 = 1); then::

    lambda^2 = (sigma1^2 / (sqrt(beta1 beta2) c sigma2))^(2/3)
               (theta^(2/3) - (sqrt(beta1 beta2) c sigma1 sigma2)^(2/3)),
    omega^2  = (D - beta2 eta_dec^2) / (beta1 eta_enc^2),
    D        = (sqrt(theta beta1 beta2) sigma1 eta_enc^2 eta_dec / sigma2^2)^(2/3).

Otherwise the best of "z1 alone" (omega = 0, lambda^2 = max(0, sigma1 sqrt(theta / beta1) -
sigma1^2)), "z2 models z1's encoder noise" (lambda = 0, omega^2 = sqrt(beta2 / beta1) c sigma1 /
sigma2 - (beta2 / beta1) c^2 when positive) and both collapsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LinearCollapse",
    "LinearHVAECollapse",
    "linear_cvae_collapse",
    "linear_hvae_collapse",
    "residual_eigenvalues",
]


@dataclass
class LinearCollapse:
    """What :func:`linear_cvae_collapse` predicts at the optimum, one entry per latent mode.

    ``theta``: the eigenvalues of the residual covariance of y given x, descending ``(d_y,)``;
    ``threshold``: beta * eta_dec^2; ``collapsed``: ``(d_z,)`` bool, mode i collapsed;
    ``singular_values``: of U1, descending ``(d_z,)``; ``encoder_std``: sigma_i ``(d_z,)``;
    ``kl``: the KL of each latent mode in nats ``(d_z,)``. Latent modes beyond d_y are
    collapsed (theta = 0).
    """

    theta: torch.Tensor
    threshold: float
    collapsed: torch.Tensor
    singular_values: torch.Tensor
    encoder_std: torch.Tensor
    kl: torch.Tensor

    @property
    def num_collapsed(self) -> int:
        return int(self.collapsed.sum())


def _moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must be (N, d_x) and (N, d_y) with the same N, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    n = x.shape[0]
    return x.T @ x / n, x.T @ y / n, y.T @ y / n


def residual_eigenvalues(Sxx: torch.Tensor, Sxy: torch.Tensor, Syy: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of E = Syy - Syx Sxx^-1 Sxy, descending, ``(d_y,)``."""
    Sxx, Sxy, Syy = Sxx.double(), Sxy.double(), Syy.double()
    if Sxx.shape[0] == 0:
        residual = Syy
    else:
        residual = Syy - Sxy.T @ torch.linalg.solve(Sxx, Sxy)
    return _eigenvalues(residual)


def _eigenvalues(S: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric part of a second-moment matrix, descending, >= 0."""
    S = S.double()
    return torch.linalg.eigvalsh(0.5 * (S + S.T)).flip(0).clamp(min=0.0)


def linear_cvae_collapse(
    Sxx: torch.Tensor | None = None,
    Sxy: torch.Tensor | None = None,
    Syy: torch.Tensor | None = None,
    z_dim: int = 1,
    beta: float = 1.0,
    eta_enc: float = 1.0,
    eta_dec: float = 1.0,
    *,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
) -> LinearCollapse:
    """Predicted collapse of the linear CVAE (module docstring) at its global optimum.

    Give the second moments ``Sxx (d_x, d_x)``, ``Sxy (d_x, d_y)``, ``Syy (d_y, d_y)``, or the
    data ``x (N, d_x)``, ``y (N, d_y)`` (uncentred second moments: the linear model has no
    biases, so centre the data or add a constant input), or the residual eigenvalues
    ``theta`` directly.

    :param z_dim: latent dimension d_z.
    :param beta: KL weight; ``eta_enc``: prior std; ``eta_dec``: decoder noise std.
    :returns: :class:`LinearCollapse`.
    """
    if z_dim < 1:
        raise ValueError(f"z_dim must be >= 1, got {z_dim}")
    if beta <= 0 or eta_enc <= 0 or eta_dec <= 0:
        raise ValueError(
            f"beta, eta_enc and eta_dec must be positive, got {beta}, {eta_enc}, {eta_dec}"
        )
    if theta is not None:
        values = torch.as_tensor(theta, dtype=torch.float64).flatten().sort(descending=True).values
    elif x is not None and y is not None:
        values = residual_eigenvalues(*_moments(x, y))
    elif Sxx is not None and Sxy is not None and Syy is not None:
        if Sxy.shape != (Sxx.shape[0], Syy.shape[0]):
            raise ValueError(
                f"Sxy must be (d_x, d_y) = ({Sxx.shape[0]}, {Syy.shape[0]}), got {tuple(Sxy.shape)}"
            )
        values = residual_eigenvalues(Sxx, Sxy, Syy)
    else:
        raise ValueError("give Sxx, Sxy and Syy, or the data x and y, or theta")
    threshold = float(beta) * float(eta_dec) ** 2
    modes = torch.zeros(z_dim, dtype=torch.float64)
    k = min(z_dim, values.numel())
    modes[:k] = values[:k]
    collapsed = modes <= threshold
    singular_values = (modes - threshold).clamp(min=0.0).sqrt() / eta_enc
    safe = torch.where(collapsed, torch.ones_like(modes), modes)
    active_std = (beta**0.5) * eta_enc * eta_dec / safe.sqrt()
    encoder_std = torch.where(collapsed, torch.full_like(modes, float(eta_enc)), active_std)
    kl = torch.where(collapsed, torch.zeros_like(modes), 0.5 * torch.log(safe / threshold))
    return LinearCollapse(values, threshold, collapsed, singular_values, encoder_std, kl)


# --------------------------------------------------------------------------------------------
# The 2-level hierarchical VAE.


@dataclass
class LinearHVAECollapse:
    """What :func:`linear_hvae_collapse` predicts at the optimum (module docstring), per mode.

    ``theta``: the eigenvalues of E[x x^T], descending ``(d_0,)``. For z1 ``(d_1,)``:
    ``z1_collapsed`` (the z1 encoder ignores that data direction, lambda = 0),
    ``w1_singular_values`` (lambda: of W1 Sxx^{1/2}, not of W1: the encoder in whitened data
    coordinates), ``u1_singular_values`` (of the decoder U1), ``kl_z1`` (E_q[log q(z1_i|x) -
    log p(z1_i|z2)], nats: not a KL, since z2 is drawn from z1, and it can be negative).
    For z2 ``(d_2,)``: ``z2_collapsed`` (omega = 0: q(z2|z1) carries nothing; a z2 mode whose
    z1 mode is collapsed can stay in use, modelling z1's encoder noise),
    ``u2_singular_values`` (omega: of U2), ``w2_singular_values`` (of W2), ``z2_std`` (the
    encoder std: learned, or the fixed ``sigma2``), ``kl_z2`` (E_q KL(q(z2_i|z1) || p(z2_i))).
    Entries are ordered by data mode; z2 mode i pairs with z1 mode i. ``num_collapsed`` counts
    per layer (a dict, where :class:`LinearCollapse` has one layer and an int).
    """

    theta: torch.Tensor
    z1_collapsed: torch.Tensor
    w1_singular_values: torch.Tensor
    u1_singular_values: torch.Tensor
    kl_z1: torch.Tensor
    z2_collapsed: torch.Tensor
    u2_singular_values: torch.Tensor
    w2_singular_values: torch.Tensor
    z2_std: torch.Tensor
    kl_z2: torch.Tensor

    @property
    def num_collapsed(self) -> dict[str, int]:
        return {"z1": int(self.z1_collapsed.sum()), "z2": int(self.z2_collapsed.sum())}


def _positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be positive and finite, got {value}")


def _spectrum(
    Sxx: torch.Tensor | None, x: torch.Tensor | None, theta: torch.Tensor | None
) -> torch.Tensor:
    """The data's second-moment eigenvalues, descending, from ``theta``, ``x`` or ``Sxx`` (the
    first of them given)."""
    if theta is not None:
        values = torch.as_tensor(theta, dtype=torch.float64).flatten().sort(descending=True).values
        if not (torch.isfinite(values).all() and (values >= 0).all()):
            raise ValueError(f"theta must be finite and >= 0 (eigenvalues), got {values.tolist()}")
        return values
    if x is not None:
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.dim() != 2 or x.shape[0] < 1 or not torch.isfinite(x).all():
            raise ValueError(
                f"x must be a finite (N, d_0) array with N >= 1, shape {tuple(x.shape)}"
            )
        return _eigenvalues(x.T @ x / x.shape[0])
    if Sxx is not None:
        Sxx = torch.as_tensor(Sxx, dtype=torch.float64)
        if Sxx.dim() != 2 or Sxx.shape[0] != Sxx.shape[1] or not torch.isfinite(Sxx).all():
            raise ValueError(
                f"Sxx must be a finite square (d_0, d_0) matrix, got {tuple(Sxx.shape)}"
            )
        return _eigenvalues(Sxx)
    raise ValueError("give Sxx, or the data x, or theta")


@dataclass(frozen=True)
class _Weights:
    """The scalars of the linear HVAE's loss: ``s1`` = sigma1, ``s2`` = z2's std where its mode
    is off (sigma2, or eta_enc when Sigma2 is ``learned``), ``b1``, ``b2`` = beta1, beta2,
    ``ee``, ``ed`` = eta_enc, eta_dec."""

    s1: float
    s2: float
    b1: float
    b2: float
    ee: float
    ed: float
    learned: bool

    @property
    def d_min(self) -> float:
        """D when z2's mode is off (omega = 0)."""
        return self.b2 * self.ed**2


def _optimum(
    th: torch.Tensor, paired: torch.Tensor, w: _Weights
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mode ``(d_1,)``, the ``(t, D)`` of least loss among the corner, the two one-sided
    optima and the joint stationary point (``paired``: the modes that have a z2 partner)."""
    s1, s2, b1, b2, ee, ed, learned = w.s1, w.s2, w.b1, w.b2, w.ee, w.ed, w.learned
    d_min = w.d_min

    def t_given(D: torch.Tensor) -> torch.Tensor:
        return torch.clamp(s1 * (th * D / (ed**2 * b1 * b2)).sqrt(), min=s1**2)

    def d_given(t: torch.Tensor) -> torch.Tensor:
        best = b1 * t if learned else ed * ee * (b1 * b2 * t).sqrt() / s2
        return torch.where(paired, best.clamp(min=d_min), torch.full_like(t, d_min))

    def loss(t: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        rest = b2 * D.log() if learned else s2**2 * D / (ed**2 * ee**2)
        return th * s1**2 / (ed**2 * t) + b1 * b2 * t / D + rest

    if learned:
        d_joint = th * s1**2 * b1 / (b2 * ed**2)
    else:
        d_joint = ((th * b1 * b2).sqrt() * s1 * ee**2 * ed / s2**2) ** (2.0 / 3.0)
    d_joint = torch.where(paired, d_joint.clamp(min=d_min), torch.full_like(th, d_min))
    corner = torch.full_like(th, s1**2), torch.full_like(th, d_min)
    candidates = [
        corner,
        (t_given(corner[1]), corner[1]),
        (corner[0], d_given(corner[0])),
        (t_given(d_joint), d_joint),
    ]
    t = torch.stack([c[0] for c in candidates])
    D = torch.stack([c[1] for c in candidates])
    best = loss(t, D).argmin(0, keepdim=True)
    return t.gather(0, best)[0], D.gather(0, best)[0]


def linear_hvae_collapse(
    Sxx: torch.Tensor | None = None,
    z1_dim: int = 1,
    z2_dim: int = 1,
    *,
    sigma1: float,
    sigma2: float | None = None,
    beta1: float = 1.0,
    beta2: float = 1.0,
    eta_enc: float = 1.0,
    eta_dec: float = 1.0,
    x: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
) -> LinearHVAECollapse:
    """Predicted collapse of the linear 2-level hierarchical VAE (module docstring) at its
    global optimum.

    Give the second moment ``Sxx = E[x x^T]`` ``(d_0, d_0)``, or the data ``x (N, d_0)``
    (uncentred: the linear model has no biases, so centre the data), or its eigenvalues
    ``theta`` directly.

    :param z1_dim, z2_dim: the latent dimensions d_1 and d_2.
    :param sigma1: the fixed std of q(z1 | x).
    :param sigma2: the fixed std of q(z2 | z1); None (default) when Sigma2 is learned.
    :param beta1, beta2: the weights of the z1 and z2 terms of the loss.
    :param eta_enc: the std of p(z2); ``eta_dec``: of p(z1 | z2) and p(x | z1).
    :returns: :class:`LinearHVAECollapse`.
    """
    if z1_dim < 1 or z2_dim < 1:
        raise ValueError(f"z1_dim and z2_dim must be >= 1, got {z1_dim} and {z2_dim}")
    _positive(
        sigma1=sigma1, sigma2=sigma2, beta1=beta1, beta2=beta2, eta_enc=eta_enc, eta_dec=eta_dec
    )
    values = _spectrum(Sxx, x, theta)
    w = _Weights(
        s1=float(sigma1),
        s2=float(eta_enc) if sigma2 is None else float(sigma2),
        b1=float(beta1),
        b2=float(beta2),
        ee=float(eta_enc),
        ed=float(eta_dec),
        learned=sigma2 is None,
    )
    th = torch.zeros(z1_dim, dtype=torch.float64)
    k = min(z1_dim, values.numel())
    th[:k] = values[:k]
    t, D = _optimum(th, torch.arange(z1_dim) < z2_dim, w)
    return _collapse_at(values, th, t, D, w, z2_dim)


def _collapse_at(
    values: torch.Tensor,
    th: torch.Tensor,
    t: torch.Tensor,
    D: torch.Tensor,
    w: _Weights,
    z2_dim: int,
) -> LinearHVAECollapse:
    """The :class:`LinearHVAECollapse` of the optimum ``(t, D)`` per z1 mode ``(d_1,)``;
    ``values`` the full spectrum, ``th`` its first d_1 entries (zero-padded)."""
    s1, s2, b1, b2, ee, ed = w.s1, w.s2, w.b1, w.b2, w.ee, w.ed
    d_min = w.d_min
    z1_dim = th.shape[0]
    lam = (t - s1**2).clamp(min=0.0).sqrt()
    omega = ((D - d_min) / (b1 * ee**2)).clamp(min=0.0).sqrt()
    u1 = lam * th.sqrt() / t
    w2 = b1 * omega * ee**2 / D
    std2 = (b2 * ed**2 * ee**2 / D).sqrt() if w.learned else torch.full_like(th, s2)
    # per-mode expectations under q: E(z1 - U2 z2)^2 and E(W2 z1)^2
    resid1 = (1 - omega * w2) ** 2 * t + omega**2 * std2**2
    kl1 = 0.5 * (resid1 / ed**2 - 1) - math.log(s1 / ed)
    kl2 = 0.5 * ((w2**2 * t + std2**2) / ee**2 - 1 - torch.log(std2**2 / ee**2))
    off = d_min * (1 + 1e-12)

    def z2_part(per_mode: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((z2_dim,), fill, dtype=torch.float64)
        n = min(z1_dim, z2_dim)
        out[:n] = per_mode[:n]
        return out

    kl_off = 0.5 * (s2**2 / ee**2 - 1) - math.log(s2 / ee)
    return LinearHVAECollapse(
        theta=values,
        z1_collapsed=lam**2 <= 1e-12 * t,  # relative to z1's variance: scale-free
        w1_singular_values=lam,
        u1_singular_values=u1,
        kl_z1=kl1,
        z2_collapsed=z2_part((D <= off).double(), 1.0).bool(),
        u2_singular_values=z2_part(omega, 0.0),
        w2_singular_values=z2_part(w2, 0.0),
        z2_std=z2_part(std2, s2),
        kl_z2=z2_part(kl2, kl_off),
    )
